"""A producer for crash and race tests: drops files, sidecar-first half-written files and
batch folders into a landing zone in random order (seeded), and remembers what it wrote."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path, PurePosixPath

from tests.helpers import sha256

SIZES = [0, 1, 17, 4096, 65_536, 300_000, 1_500_000, 6_000_000]
WEIGHTS = [3, 3, 10, 20, 25, 20, 12, 4]


def signal_text(rng: random.Random, rel: str, data: bytes) -> tuple[str, str]:
    """(signal suffix, body) in one of the accepted forms."""
    name = PurePosixPath(rel).name
    kind = rng.choice(["bare", "gnu", "gnu_binary", "bsd", "sha512", "md5", "done_digest"])
    h = sha256(data)
    if kind == "bare":
        return ".sha256", h + "\n"
    if kind == "gnu":
        return ".sha256", f"{h}  {name}\n"
    if kind == "gnu_binary":
        return ".sha256", f"{h} *{name}\n"
    if kind == "bsd":
        return ".sha256", f"SHA256 ({name}) = {h}\n"
    if kind == "sha512":
        return ".sha512", f"{hashlib.sha512(data).hexdigest()}  {name}\n"
    if kind == "md5":
        return ".md5", f"{hashlib.md5(data).hexdigest()}  {name}\n"
    return ".done", f"{h}  {name}\n"


class Producer:
    """Drops files in steps. A step writes whole files, or begins a file by writing its
    sidecar and the first part of the payload (finished in a later step: the A→B→C race
    relay must not fall for), or completes a batch folder (members, manifest, _SUCCESS)."""

    def __init__(self, root: Path, rng: random.Random, files: int = 300,
                 batches: int = 6, sizes: list[int] = SIZES,
                 weights: list[int] = WEIGHTS) -> None:
        self.root = root
        self.rng = rng
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, list[str]] = {}
        self.todo: list[tuple[str, object]] = []
        self.unfinished: list[tuple[str, bytes]] = []
        for i in range(files):
            size = rng.choices(sizes, weights)[0]
            rel = f"d{i % 7}/{'' if i % 3 else 'sub/'}f{i}{rng.choice(['.csv', '.bin', ''])}"
            data = rng.randbytes(size)
            self.files[rel] = data
            self.todo.append(("file", rel))
        for b in range(batches):
            d = f"batch{b}"
            members = []
            for m in range(rng.randint(1, 6)):
                rel = f"{d}/part-{m}.csv"
                self.files[rel] = rng.randbytes(rng.choices(sizes[:6], weights[:6])[0])
                members.append(rel)
            manifest = "".join(f"{sha256(self.files[m])}  {PurePosixPath(m).name}\n"
                               for m in members)
            self.files[f"{d}/SHA256SUMS"] = manifest.encode()
            self.files[f"{d}/_SUCCESS"] = b""
            self.batches[d] = [*members, f"{d}/SHA256SUMS"]
            self.todo.append(("batch", d))
        rng.shuffle(self.todo)

    def _write(self, rel: str, data: bytes) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def step(self, n: int) -> None:
        for rel, data in self.unfinished:  # second half of a payload whose sidecar is out
            with open(self.root / rel, "ab") as f:
                f.write(data[len(data) // 2:])
        self.unfinished = []
        batch, self.todo = self.todo[:n], self.todo[n:]
        for kind, what in batch:
            assert isinstance(what, str)
            if kind == "batch":
                for m in self.batches[what][:-1]:
                    self._write(m, self.files[m])
                self._write(f"{what}/SHA256SUMS", self.files[f"{what}/SHA256SUMS"])
                self._write(f"{what}/_SUCCESS", b"")
                continue
            data = self.files[what]
            suffix, body = signal_text(self.rng, what, data)
            if len(data) > 1 and self.rng.random() < 0.25:
                self._write(what + suffix, body.encode())  # signal first, payload half-done
                p = self.root / what
                p.write_bytes(data[: len(data) // 2])
                self.unfinished.append((what, data))
            else:
                self._write(what, data)
                self._write(what + suffix, body.encode())

    def finish(self) -> None:
        while self.todo or self.unfinished:
            self.step(len(self.todo))
