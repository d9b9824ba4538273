"""XMP packets with the standard library: the sidecar we write, and what a packet (ours or anyone's) says.

    text = packet(Fields("a dog runs on the beach", alt_text="a dog runs on the beach",
                         marker={"Model": "models/flickr8k-lite0-ensemble", "Revision": "sha256:0123abcd",
                                 "TextHash": text_hash("a dog runs on the beach")}))
    found = read_packet(Path("photo.jpg.xmp").read_bytes())   # Fields: description, alt_text, marker, foreign

Only what tagging needs is read: ``dc:description`` and IPTC's ``AltTextAccessibility`` (their
``x-default`` entry, else the first), our own marker properties (namespace :data:`NS_STORYTELLER`), and
whether the packet holds any other property (a sidecar of darktable, digiKam or Lightroom then: it is
edited with exiftool, never rewritten by us).
"""
from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

__all__ = ["NS_STORYTELLER", "MARKER_KEYS", "Fields", "packet", "read_packet", "find_packet", "text_hash"]

NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DC = "http://purl.org/dc/elements/1.1/"
NS_IPTC_CORE = "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/"
# Our marker's namespace. The .invalid domain is reserved (RFC 2606), so the URI can never be anyone else's;
# XMP namespace URIs are names, never fetched.
NS_STORYTELLER = "http://ns.neural-storyteller.invalid/1.0/"
NS_X = "adobe:ns:meta/"
NS_XML = "http://www.w3.org/XML/1998/namespace"
MARKER_KEYS = ("Model", "Revision", "Confidence", "TextHash", "Reviewed")
_XMP_START = re.compile(rb"<x:x[am]pmeta|<rdf:RDF")
_XMP_END = {b"<x:xmpmeta": b"</x:xmpmeta>", b"<x:xapmeta": b"</x:xapmeta>", b"<rdf:RDF": b"</rdf:RDF>"}
# rdf:Description's own attributes, and XMP's packet bookkeeping, which are not properties of the photo
_NOT_PROPERTIES = {f"{{{NS_RDF}}}about", f"{{{NS_RDF}}}ID", f"{{{NS_RDF}}}nodeID", "{adobe:ns:meta/}xmptk",
                   f"{{{NS_XML}}}lang"}


@dataclass
class Fields:
    """What an XMP packet says about a photo's description.

    Args:
        description: ``dc:description`` (x-default), "" when absent.
        alt_text: ``Iptc4xmpCore:AltTextAccessibility`` (x-default), "" when absent.
        marker: our marker properties (``MARKER_KEYS``) found, as strings.
        foreign: the packet holds properties other than these (another program's metadata).
    """

    description: str = ""
    alt_text: str = ""
    marker: dict[str, str] = field(default_factory=dict)
    foreign: bool = False


def text_hash(text: str) -> str:
    """The short SHA-256 of a caption that our marker keeps, so a person's later edit shows.

    Args:
        text: the caption as written.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _alt(tag: str, text: str) -> str:
    return (f"   <{tag}>\n    <rdf:Alt>\n     <rdf:li xml:lang=\"x-default\">{escape(text)}</rdf:li>\n"
            f"    </rdf:Alt>\n   </{tag}>\n")


def packet(fields: Fields) -> str:
    """A complete XMP sidecar (``x:xmpmeta``) holding ``fields``: description, alt text and marker.

    Args:
        fields: what to write (``foreign`` is ignored; marker keys with an empty value are left out).
    """
    marker = "".join(f"   <storyteller:{k}>{escape(v)}</storyteller:{k}>\n"
                     for k, v in fields.marker.items() if k in MARKER_KEYS and v)
    body = (_alt("dc:description", fields.description) if fields.description else "") + \
        (_alt("Iptc4xmpCore:AltTextAccessibility", fields.alt_text) if fields.alt_text else "") + marker
    return ("<?xpacket begin=\"\ufeff\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n"
            f"<x:xmpmeta xmlns:x={quoteattr(NS_X)}>\n"
            f" <rdf:RDF xmlns:rdf={quoteattr(NS_RDF)}>\n"
            f"  <rdf:Description rdf:about=\"\"\n    xmlns:dc={quoteattr(NS_DC)}\n"
            f"    xmlns:Iptc4xmpCore={quoteattr(NS_IPTC_CORE)}\n    xmlns:storyteller={quoteattr(NS_STORYTELLER)}>\n"
            f"{body}  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"w\"?>\n")


def find_packet(data: bytes) -> bytes | None:
    """The first XMP packet (``x:xmpmeta``, else a bare ``rdf:RDF``) inside a file's bytes, or None.

    XMP is stored as plain UTF-8 in JPEG (APP1), PNG (iTXt), WebP (an XMP chunk), TIFF (tag 700) and
    sidecars, so a byte search finds it in each.

    Args:
        data: the file's bytes.
    """
    m = _XMP_START.search(data)
    if m is None:
        return None
    end = data.find(_XMP_END[m.group(0)], m.end())
    return None if end < 0 else data[m.start():end + len(_XMP_END[m.group(0)])]


def _lang_alt(prop: ET.Element) -> str:
    """The x-default entry of an rdf:Alt (else its first entry, else the property's own text)."""
    items = prop.findall(f"{{{NS_RDF}}}Alt/{{{NS_RDF}}}li") or prop.findall(f".//{{{NS_RDF}}}li")
    for li in items:
        if li.get(f"{{{NS_XML}}}lang", "").lower() == "x-default":
            return (li.text or "").strip()
    return (items[0].text or "").strip() if items else (prop.text or "").strip()


def read_packet(data: bytes) -> Fields:
    """What an XMP packet says (see :class:`Fields`).

    Args:
        data: a sidecar's bytes or a packet from :func:`find_packet`.

    Raises:
        ValueError: not well-formed XML.
    """
    xml = find_packet(data) or data
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ValueError(f"not a readable XMP packet ({e})") from None
    found = Fields()
    for desc in root.iter(f"{{{NS_RDF}}}Description"):
        for name, value in desc.attrib.items():  # simple properties may be written as attributes
            if name.startswith(f"{{{NS_STORYTELLER}}}"):
                found.marker[name.split("}", 1)[1]] = value
            elif name not in _NOT_PROPERTIES:
                found.foreign = True
        for prop in desc:
            if prop.tag == f"{{{NS_DC}}}description":
                found.description = _lang_alt(prop)
            elif prop.tag == f"{{{NS_IPTC_CORE}}}AltTextAccessibility":
                found.alt_text = _lang_alt(prop)
            elif prop.tag.startswith(f"{{{NS_STORYTELLER}}}"):
                found.marker[prop.tag.split("}", 1)[1]] = (prop.text or "").strip()
            else:
                found.foreign = True
    return found
