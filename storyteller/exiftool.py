"""The exiftool program (Phil Harvey's ExifTool; Debian: ``libimage-exiftool-perl``), kept running for a whole
tag run, writing metadata into a copy of a photo.

    with ExifTool() as et:                      # raises ExifToolMissing when it is not installed
        error = et.write(".photo.jpg.tmp.jpg", {"XMP-dc:Description": "a dog"})   # a copy

ExifTool is run as a separate program, never linked: the app and the rest of the package run without it.
One process serves every photo (``-stay_open``), so a photo costs milliseconds, not a Perl start-up.
Our marker's namespace (``storyteller.xmp.NS_STORYTELLER``) is declared to it in a small config file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .xmp import MARKER_KEYS, NS_STORYTELLER

__all__ = ["ExifTool", "ExifToolMissing", "find_exiftool"]

_CONFIG = """%Image::ExifTool::UserDefined = (
    'Image::ExifTool::XMP::Main' => {
        storyteller => { SubDirectory => { TagTable => 'Image::ExifTool::UserDefined::storyteller' } },
    },
);
%Image::ExifTool::UserDefined::storyteller = (
    GROUPS => { 0 => 'XMP', 1 => 'XMP-storyteller', 2 => 'Image' },
    NAMESPACE => { 'storyteller' => '""" + NS_STORYTELLER + """' },
    WRITABLE => 'string',
""" + "".join(f"    {k} => {{ }},\n" for k in MARKER_KEYS) + """);
1;
"""


class ExifToolMissing(RuntimeError):
    """exiftool is not installed (or not runnable); the message says how to get it."""


def find_exiftool() -> str | None:
    """The exiftool program to run: ``$STORYTELLER_EXIFTOOL`` if set (an empty value: none), else ``exiftool``
    on the PATH; None when there is none."""
    given = os.environ.get("STORYTELLER_EXIFTOOL")
    if given is not None:
        return shutil.which(given) if given else None
    return shutil.which("exiftool")


class ExifTool:
    """One running exiftool (``-stay_open``); use it as a context manager.

    Args:
        program: the executable (default: :func:`find_exiftool`).

    Raises:
        ExifToolMissing: no exiftool.
    """

    def __init__(self, program: str | None = None):
        self.program = program or find_exiftool()
        if not self.program:
            raise ExifToolMissing("--embed writes into photos with the exiftool program, which is not installed: "
                                  "install it (Debian/Ubuntu: apt-get install libimage-exiftool-perl; macOS: brew "
                                  "install exiftool; Windows: exiftool.org), or leave out --embed to write XMP sidecars")
        fd, self._config = tempfile.mkstemp(prefix="storyteller-exiftool-", suffix=".config")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_CONFIG)
        try:
            self._proc = subprocess.Popen([self.program, "-config", self._config, "-stay_open", "True", "-@", "-"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            os.unlink(self._config)
            raise ExifToolMissing(f"cannot run exiftool ({self.program}): {e.strerror or e}") from None
        self._n = 0

    def run(self, args: list[str]) -> tuple[str, str]:
        """Run one exiftool command (its arguments, one per line: no newline inside one); (stdout, stderr)."""
        self._n += 1
        n = self._n
        lines = [*args, "-echo4", f"{{done{n}}}", f"-execute{n}"]
        self._proc.stdin.write(("\n".join(lines) + "\n").encode("utf-8"))
        self._proc.stdin.flush()
        out = self._read_until(self._proc.stdout, f"{{ready{n}}}")
        err = self._read_until(self._proc.stderr, f"{{done{n}}}")
        return out, err

    @staticmethod
    def _read_until(stream, end: str) -> str:
        lines = []
        while True:
            line = stream.readline()
            if not line:
                raise RuntimeError("exiftool stopped unexpectedly")
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if text == end:
                return "\n".join(lines)
            lines.append(text)

    def write(self, path: str | os.PathLike, tags: dict[str, str]) -> str | None:
        """Set ``tags`` in the file ``path`` (an empty value deletes the tag), in place: exiftool writes its own
        temporary file and renames it over ``path``. Callers give it a copy (exiftool 12.57 cannot write a
        WebP file to a new name with ``-o``, so a copy is the one way that works for every format).

        Args:
            path: the file (a temporary copy of a photo or sidecar).
            tags: exiftool tag names (``XMP-dc:Description``) and values.

        Returns:
            None on success, else exiftool's error in one line.
        """
        args = ["-charset", "filename=utf8", "-overwrite_original"]
        args += [f"-{k}={' '.join(v.split())}" for k, v in tags.items()]
        # an absolute path: an argument line starting with '#' is a comment to exiftool, one with '-' an option
        args.append(str(Path(path).absolute()))
        out, err = self.run(args)
        problems = [line for line in err.splitlines() if line.startswith("Error")]
        if problems or not any(word in out for word in ("1 image files updated", "1 image files unchanged")):
            return " ".join((problems or err.splitlines() or out.splitlines() or ["exiftool wrote nothing"])[0].split())
        return None

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(b"-stay_open\nFalse\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            stream.close()
        try:
            os.unlink(self._config)
        except OSError:
            pass

    def __enter__(self) -> ExifTool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
