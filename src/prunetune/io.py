"""Loading models (local HF dir, Hub id, GGUF file), atomic output directories, file manifests."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import sparse_storage
from .errors import OutputWriteError, PrunetuneError, writing
from .manifest import sha256_file
from .paths import DEFAULT_MODEL

log = logging.getLogger("prunetune")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MANIFEST = "prunetune_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise PrunetuneError(f"unknown dtype '{name}' (choose from: float32, bfloat16, float16)") from None


@dataclass
class ModelSource:
    """Where a model came from, resolved from what the user typed."""

    spec: str
    kind: str  # "local", "gguf", "hub"
    path: str  # directory (local), directory holding the gguf file, or hub id
    gguf_file: str | None = None
    weight_files: list[str] = field(default_factory=list)
    origin: str | None = None  # a checkpoint stored compressed: its folder (``path`` is then its dense view)

    @property
    def home(self) -> str:
        """The folder the user named (not the temporary dense view of a compressed checkpoint)."""
        return self.origin or self.path

    def location(self) -> str:
        """The model as an absolute path (the .gguf file for GGUF), or the Hub id: recorded as ``source_model``."""
        if self.kind == "hub":
            return self.spec
        p = Path(self.path) / self.gguf_file if self.gguf_file else Path(self.home)
        return str(p.expanduser().resolve())

    def describe(self, with_hash: bool = True) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "path": self.home}
        if self.origin:
            d["stored"] = sparse_storage.FORMAT
        if self.gguf_file:
            d["gguf_file"] = self.gguf_file
        if with_hash and self.weight_files:
            d["weights_sha256"] = {Path(f).name: sha256_file(f) for f in self.weight_files}
        return d


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and " " not in spec


def resolve_model(spec: str | os.PathLike | None) -> ModelSource:
    """Turn a user's model argument into a source; clear errors for anything unusable."""
    if spec is None or str(spec) == "":
        spec = str(DEFAULT_MODEL)
    spec = str(spec)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise PrunetuneError(f"model file '{spec}' is not a GGUF file (give a model directory, a Hub id or a .gguf)")
        return ModelSource(spec, "gguf", str(p.parent), p.name, [str(p)])
    if p.is_dir():
        if (p / "config.json").is_file():
            files = sorted(str(f) for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
            if not files:
                raise PrunetuneError(f"model directory '{spec}' has a config.json but no weight files")
            if sparse_storage.is_compressed(p):  # every command reads it through a dense copy of its own
                verify_manifest(p)
                return ModelSource(spec, "local", str(sparse_storage.dense_view(p)), None, files, origin=str(p))
            return ModelSource(spec, "local", str(p), None, files)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, "gguf", str(p), ggufs[0].name, [str(ggufs[0])])
        raise PrunetuneError(f"'{spec}' is not a model directory (no config.json{' and several .gguf files' if ggufs else ''})")
    if _looks_like_hub_id(spec):
        return ModelSource(spec, "hub", spec)
    raise PrunetuneError(f"model path '{spec}' does not exist")


def _strip_gguf_quantizer(model) -> None:
    """A GGUF checkpoint is dequantised on load; forget the quantizer so it saves as a plain checkpoint."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_model(spec=None, *, dtype="float32", device="cpu", tokenizer: bool = True, trust_remote_code=False):
    """Load (model, tokenizer, info). ``spec``: local HF dir, a .gguf file (or a dir with one), or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    verify_manifest(src.path) if src.kind == "local" else None
    torch_dtype = parse_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
        tok = AutoTokenizer.from_pretrained(src.path, **({"gguf_file": src.gguf_file} if src.gguf_file else {})) if tokenizer else None
    except PrunetuneError:
        raise
    except OSError as e:
        if src.kind == "hub":
            raise PrunetuneError(f"cannot fetch '{src.spec}' from the Hugging Face Hub (offline, or no such model): {str(e).splitlines()[0]}") from None
        raise PrunetuneError(f"cannot load model '{src.spec}': {str(e).splitlines()[0]}") from None
    except Exception as e:
        if not isinstance(e, (ValueError, KeyError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        if src.kind == "local":
            _diagnose_local(src)  # names the damaged file or the mismatched tensor, when that is the cause
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrunetuneError(f"cannot load model '{src.spec}': {msg}") from None
    if src.kind == "gguf":
        _strip_gguf_quantizer(model)
    check_finite(model)
    model.to(device)
    model.eval()
    info = src.describe()
    info.update(model_type=model.config.model_type, parameters=sum(p.numel() for p in model.parameters()),
                dtype=str(torch_dtype).replace("torch.", ""))
    return model, tok, info


def _diagnose_local(src: ModelSource) -> None:
    """Raise the precise reason a local safetensors checkpoint failed to load, if it is a damaged or
    truncated file or a config that does not match the weights (transformers' own messages say neither)."""
    if not any(f.endswith(".safetensors") for f in src.weight_files):
        return
    from .checkpoint import SafetensorsSource, check_shapes, skeleton

    try:
        source = SafetensorsSource(src.path)  # raises naming a missing, damaged or truncated file
        check_shapes(skeleton(src.path, torch.float32), source)
    except PrunetuneError:
        raise
    except Exception:  # not one of these causes: the caller reports transformers' own message
        return


def all_finite(t: torch.Tensor, dtype: torch.dtype | None = None, chunk_elems: int = 1 << 22) -> bool:
    """``torch.isfinite(t.to(dtype)).all()`` in chunks: the one-shot form makes a bool copy of the whole
    tensor (121 MB for a float32 11008 x 11008 Hessian), and a converted copy when ``dtype`` differs."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk_elems].to(dtype or t.dtype)).all())
               for i in range(0, flat.numel(), chunk_elems))


def check_finite(model) -> None:
    """Refuse weights holding NaN/Inf, naming the tensor (they would only show up later as NaN losses)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not all_finite(p.data):
            raise PrunetuneError(f"weights of '{name}' contain NaN/Inf")


# --- output directories --------------------------------------------------------------------------
def partial_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


@contextmanager
def run_lock(out: str | Path):
    """Hold an OS lock on ``.<out>.lock`` beside ``out`` for a whole run. A second job asked to write the same
    output refuses to start, instead of removing the first one's working folder as the leftovers of an
    interrupted run. A killed run leaves no stale lock (the OS drops it with the process); the file is removed
    when the run ends. A no-op where the OS has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield None
        return
    out = Path(out).expanduser().resolve()
    path = out.parent / f".{out.name}.lock"
    made = not out.parent.exists()
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PrunetuneError(f"another prunetune run is writing '{out}' (it holds '{path}'): wait for it to "
                                     "finish or choose another output directory") from None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as it finished: lock the new one
    try:
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        if made:
            try:
                out.parent.rmdir()  # only if empty: the run published nothing there
            except OSError:
                pass


def check_output_dir(out: str | Path, *, overwrite: bool, inputs: tuple = ()) -> Path:
    """Refuse outputs that would clobber work or land inside an input directory."""
    out = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        ip = Path(str(inp)).expanduser()
        if ip.exists():
            ip = ip.resolve()
            base = ip if ip.is_dir() else ip.parent
            if out == base or base in out.parents:
                raise PrunetuneError(f"output directory '{out}' is inside the input '{ip}'")
    if out.exists() and not overwrite:
        raise PrunetuneError(f"output directory '{out}' already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise PrunetuneError(f"output path '{out}' exists and is not a directory")
    check_writable(out.parent)
    return out


def check_output_file(out: str | Path) -> Path:
    """Refuse a result-file path that cannot be written, before any work is done."""
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise PrunetuneError(f"output path '{out}' is a directory (give a file name)")
    check_writable(out.parent)
    return out


def check_writable(directory: Path) -> None:
    """Refuse a folder that cannot be created or written to.

    Tried rather than asked: permission bits say nothing for root, ACLs or read-only mounts. Nothing is
    created: the probe goes into the nearest existing folder and is removed at once."""
    d = Path(directory)
    existing = d
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "it" if existing == d else f"'{existing}'"
        raise PrunetuneError(f"cannot write to '{d}': {what} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".prunetune-probe-", dir=existing))
    except OSError as e:
        raise PrunetuneError(f"cannot write to '{d}': {e.strerror or e}") from None


@contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False, keep_partial=False):
    """Yield a sibling temp dir; on success it replaces ``out`` in one rename.

    On failure the temp dir is removed, unless ``keep_partial`` (a bool, or a function of the temp dir
    saying whether it holds resumable work) and the failure was not bad input: resumable jobs keep it
    after a crash, Ctrl-C or a full disk so ``--resume`` can continue (it is hidden and named
    ``.<out>.partial``). A write the system refuses becomes one `OutputWriteError` line."""
    out = Path(out).expanduser().resolve()
    tmp = partial_dir_for(out)
    with writing(tmp):
        tmp.mkdir(parents=True, exist_ok=True)

    def keep() -> bool:
        return bool(keep_partial(tmp) if callable(keep_partial) else keep_partial)

    try:
        with writing(tmp):
            yield tmp
    except OutputWriteError as e:
        if not keep():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        raise OutputWriteError(f"{e} (the finished work is kept in '{tmp}': make room and rerun with --resume)") from None
    except PrunetuneError:  # bad input found on the way: nothing worth resuming
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        if not keep():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out, overwrite)


def publish_dir(stage: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder ``stage`` to ``out`` (an existing ``out`` is replaced only now, in one step)."""
    old = None
    if out.exists():
        if not overwrite:
            raise PrunetuneError(f"output directory '{out}' already exists (use --overwrite to replace it)")
        old = out.parent / f".{out.name}.old-{os.getpid()}-{id(stage):x}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def usual_file_mode() -> int:
    """The mode a new file gets from this process's umask (``0o644`` under the common ``022``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_manifest(directory: str | Path, record: dict) -> dict:
    """Write prunetune_manifest.json: what was done, with the sha256 of every file in the directory.

    Files get the usual mode of new files first (safetensors writes its files ``0600``, so others on a shared
    machine could not read a published checkpoint)."""
    directory = Path(directory)
    mode = usual_file_mode()
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != MANIFEST and ".partial" not in f.parts[-2:-1] and "resume" not in f.relative_to(directory).parts:
            files[str(f.relative_to(directory))] = sha256_file(f)
    manifest = dict(record)
    manifest["files"] = files
    with open(directory / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2, default=str)
        fh.write("\n")
    return manifest


def verify_manifest(directory: str | Path) -> None:
    """If ``directory`` is a prunetune output, check every file against its recorded hash."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError):
        raise PrunetuneError(f"'{path}' is damaged (not a prunetune manifest)") from None
    for name, digest in files.items():
        f = Path(directory) / name
        if not f.is_file():
            raise PrunetuneError(f"'{f}' is missing (listed in {MANIFEST})")
        if sha256_file(f) != digest:
            raise PrunetuneError(f"'{f}' is damaged (sha256 does not match {MANIFEST})")


def save_model(model, tokenizer, directory: str | Path, record: dict | None = None) -> None:
    """save_pretrained + tokenizer + manifest into an (already temporary) directory."""
    directory = Path(directory)
    with writing(directory):
        model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        write_manifest(directory, record or {})
