"""
The plumbing every script shares, each piece defined once: how files are written and read, how
a run finds its rank and device, which precision it computes in, and how it reports progress.
Nothing here is about the paper; train.py, distill.py, evaluate.py, bench.py and predict.py
point here from their docstrings.

Commands
    entry_point(main)           a script's main as a command: a user's mistake is one line and
                                exit 1, Ctrl-C one line and exit 130, a bug a traceback; the
                                memory of freed tensors serves the next ones (keep_freed_memory)
    positive_int, natural_int, positive_float, non_negative_float, rate
                                argparse types: a numeric option is checked where it is parsed

Files
    save_atomic(path, write)    every result, checkpoint and converted sample is written to a
                                temporary file, flushed to disk and renamed: a kill or a power
                                loss leaves the old file or the new one, never half of one; a
                                failed write (a full disk) removes the temporary file and names
                                the file and the cause
    check_output(path, flag)    before long work: can the output be written, and would it
                                replace a result? (never silently: --overwrite says so)
    load_file(path)             torch.load onto the CPU, tensors and plain Python only, with
                                errors that name the file
    read_state_dict, load_strict  a state dict out of any official, Hugging Face (.safetensors,
                                .bin, or the folder) or own checkpoint, loaded with strict key
                                matching; a mismatch lists every missing, unexpected and
                                misshapen key, a non-finite weight its tensors, and names the file

Distributed (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; a plain process is rank 0 of 1)
    process_group(device)       with it as (rank, world_size, device): the process group for
                                the block, destroyed however the block is left
    eval_loader(...)            each rank's share of an evaluation set: every world_size-th
                                sample, no padding, so that metric sums added over the ranks are
                                exactly the single-process ones

Precision (one flag, --precision, in every script)
    fp32                        no autocast
    bf16, fp16                  torch.autocast of the forward pass and the loss; the weights stay
                                fp32; fp16 also needs GradScaler in training (bf16 has fp32's
                                exponent range and does not)
    auto                        bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU
"""

import argparse
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

# ---------------------------------------------------------------------------------------------
# Commands

# What a user's mistake raises (a bad option, a missing or unreadable file, a run that went
# non-finite): entry_point prints its message as one line. Anything else is a bug: a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def entry_point(main):
    """Run a script's main() as a command, exiting with the status it returns (0 if none). A user's mistake prints one line, 'script: message',
    and exits 1; Ctrl-C prints one line and exits 130; EMUFORMER_TRACEBACK=1 shows the
    traceback of either. The exception is let go of before the exit, and with it every frame it
    holds (a DDP wrapper among them, see process_group). Before main, it keeps freed memory for
    reuse (keep_freed_memory)."""
    script = os.path.basename(sys.argv[0])
    keep_freed_memory()
    signal.signal(signal.SIGINT, interrupt_once)
    try:
        status = main()
    except KeyboardInterrupt as e:
        if os.environ.get('EMUFORMER_TRACEBACK'):
            raise
        code, message = 130, str(e) or 'interrupted'
    except USER_ERRORS as e:
        if os.environ.get('EMUFORMER_TRACEBACK'):
            raise
        code, message = 1, str(e)
    else:  # main's exit status, if it returns one (predict.py: 1 when an input was skipped)
        sys.exit(status if isinstance(status, int) else 0)
    print(f'{script}: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def keep_freed_memory():
    """Let the memory of freed tensors serve the next ones, where glibc allocates (Linux); elsewhere
    do nothing. Returns whether glibc took the setting.

    By itself glibc gives every block over 32 MiB a mapping of its own and unmaps it when it is
    freed (smaller ones too, until its threshold has grown). A full-resolution map of a
    prediction (40 classes at 480x640: 49 MB) then comes back as fresh pages, and the kernel
    faults in and zeroes each 4 KiB page at its first touch, at a cost that bench.py's row
    segdepthformer-plain-memory measures (docs/results.md). Here every block comes from glibc's
    heap, which never gives memory back: the process holds on to its peak memory and more, as
    PyTorch's 64-byte aligned blocks do not fit exactly into a freed block of their own size
    and reuse freed memory only once the heap holds free space around them
    (tests/test_plumbing.py; docs/results.md has a prediction's resident memory both ways)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# Numeric options are checked where they are parsed: these are argparse types, and argparse
# names the option: "argument --batch-size: 0 is not an integer >= 1".

def _number(text, kind, ok, what):
    """text as `kind` (int or float) if it is a finite number for which ok(value) holds; else
    argparse's error, which names the option: '{text} is not {what}'."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f'{text} is not {what}')
    return value


def positive_int(text):
    return _number(text, int, lambda v: v >= 1, 'an integer >= 1')


def natural_int(text):
    return _number(text, int, lambda v: v >= 0, 'an integer >= 0')


def positive_float(text):
    return _number(text, float, lambda v: v > 0, 'a number > 0')


def non_negative_float(text):
    return _number(text, float, lambda v: v >= 0, 'a number >= 0')


def rate(text):
    """A probability of dropping (dropout, stochastic depth): in [0, 1)."""
    return _number(text, float, lambda v: 0 <= v < 1, 'a rate in [0, 1)')


def interrupt_once(signum, frame):
    """The first Ctrl-C stops the script; more (torchrun passes one on to every rank that the
    terminal already sent one) are ignored, so that none cuts short the way out, where the
    process group is destroyed and the files are closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# Files


def save_atomic(path, write):
    """write(f) into a temporary file beside `path` (opened 'wb'), flush it to the disk, and
    rename it to `path`. The rename is atomic, and the fsync before it makes sure that what the
    new name points to is on the disk, not only in the page cache (a rename without it can
    leave an empty file after a power loss). If anything fails, the temporary file is removed,
    so that a full disk is not kept full by it, and the error names `path` and the cause."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a KeyboardInterrupt too: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        cause = f'{type(e).__name__}: {e}' + ('' if free is None else f'; {free / 2**20:.0f} MiB free on its disk')
        raise OSError(f'could not write {path} ({cause}); the previous file, if any, is unchanged') from e
    directory = os.open(path.parent, os.O_RDONLY)  # and the rename itself, recorded in the folder
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_torch(obj, path):
    save_atomic(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    """obj as indented JSON, atomically; NaN and inf are refused (json_safe turns them into null)."""
    save_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, allow_nan=False).encode() + b'\n'))


def json_safe(x):
    """Results -> JSON-able: NaN (a metric with nothing to count) and inf become null."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float):  # numpy's float64 is a float too
        return float(x) if math.isfinite(x) else None
    return x


def check_output(path, flag, overwrite=False, folder=False):
    """Make sure now, before any long work, that `path` (a file, or a folder with folder=True)
    can be written, and that writing it replaces no earlier result unless `overwrite`. `flag` is
    the command-line flag that named it, for the message."""
    path = Path(path)
    taken = any(path.iterdir()) if folder and path.is_dir() else path.exists() and not folder
    if taken and not overwrite:
        raise FileExistsError(f'{flag} {path} already holds a result; pass --overwrite to replace it, '
                              f'or choose another {flag}')
    directory = path if folder else path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise OSError(f'{flag} {path}: cannot write to {directory} ({e.strerror or e})') from None


def load_file(path):
    """torch.load onto the CPU (tensors and plain Python only), with errors that name the file.
    It is given the open file, not the name, which recent torch versions read for a format."""
    try:
        with open(path, 'rb') as f:
            return torch.load(f, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({load_failure(e)})") from e


def load_failure(e):
    """The reason torch.load gave for refusing a file, as one line: its first sentence, or the
    exception's name where it gave none (an empty file's EOFError). torch's unpickler for weights
    only (tensors and plain Python) puts its reason after 'WeightsUnpickler error:', behind
    advice to load with weights_only=False, which would run any code the file holds; only the
    reason is kept."""
    reason = str(e).split('WeightsUnpickler error:')[-1].strip()
    return reason.split('\n')[0].split('. ')[0].rstrip('.') or type(e).__name__


def read_state_dict(path):
    """The state dict of a checkpoint, recognised from what the file holds, not from its name:
    PyTorch's format (.pth, .pt, Hugging Face's pytorch_model.bin), bare or wrapped under
    'state_dict' or 'model'; or a .safetensors file; or a folder that Hugging Face's
    save_pretrained wrote (its model.safetensors or pytorch_model.bin)."""
    path = weights_file(path)
    if is_safetensors(path):
        return read_safetensors(path)
    ckpt = load_file(path)
    for key in ('state_dict', 'model'):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if not (isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values())):
        raise ValueError(f'{path}: holds no state dict (a {type(ckpt).__name__})')
    return ckpt


def weights_file(path):
    """A folder written by Hugging Face's save_pretrained -> its weights file; a file -> itself."""
    if not os.path.isdir(path):
        return path
    for name in ('model.safetensors', 'pytorch_model.bin'):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f'{path}: a folder without model.safetensors or pytorch_model.bin '
                            f'(a sharded checkpoint is not read)')


def read_config(path):
    """The config.json of a Hugging Face folder (or beside its weights file), else None."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, 'config.json')
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{config}: not a readable JSON file ({e})') from None


def is_safetensors(path):
    """The safetensors format opens with an 8-byte header length and the header's '{'."""
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except FileNotFoundError:
        raise FileNotFoundError(f'checkpoint not found: {path}') from None
    return len(head) == 9 and head[8:] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, with no package: an 8-byte little-endian length n,
    n bytes of JSON {name: {'dtype', 'shape', 'data_offsets': [begin, end]}} (and an optional
    '__metadata__'), then the tensors' bytes, little-endian and row-major, at those offsets
    (counted from the end of the header)."""
    try:
        with open(path, 'rb') as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
            data = f.read()
        state = {}
        for name, entry in header.items():
            if name == '__metadata__':
                continue
            begin, end = entry['data_offsets']
            dtype = SAFETENSORS_DTYPES[entry['dtype']]
            chunk = bytearray(data[begin:end])  # a writable copy: the tensor owns its memory
            flat = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
            state[name] = flat.reshape(entry['shape'])
        return state
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e})') from None


def load_strict(module, state, source):
    """load_state_dict(strict=True), but a mismatch names every missing and unexpected key and
    every shape conflict, and says which file they came from."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                             ('shape conflicts', shapes)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ', '.join(items[:20])
                             + (' ...' if len(items) > 20 else ''))
        raise ValueError('\n'.join(lines))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:5])}); not loaded")
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Distributed


@contextmanager
def process_group(device):
    """with process_group(device) as (rank, world_size, device): the ranks from torchrun's
    environment (a plain process is rank 0 of 1), each on the GPU of its LOCAL_RANK; NCCL
    between GPUs, gloo between CPU processes. However the block is left (its end, an error,
    Ctrl-C), the process group is destroyed on the way out.

    Destroying it must free it, with its worker threads, while Python still runs. A gloo worker
    thread lets go of each finished collective itself, and that work item holds a Python object
    (in its saved thread-local state): should the interpreter already be shutting down, taking
    the GIL ends the thread inside a C++ destructor, and the process aborts ("terminate called
    without an active exception"). Two things kept the group alive past its destruction:
    torch.distributed.nn.functional binds group.WORLD as the default argument of its functions
    when it is first imported, which DDP and torch.compile do (through torch._dynamo); imported
    here first, its defaults are None. And the DDP wrapper holds the group: callers keep it in a
    local of a function that has returned by the time the block is left (or, on an error, that
    entry_point has let go of)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        yield 0, 1, device
        return
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    import torch.distributed.nn.functional  # noqa: F401  before the group exists (see above)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    rank = int(os.environ['RANK'])
    try:
        yield rank, world_size, device
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or '/gloo/' in str(e)):
            raise
        # a collective failed because another rank stopped: that rank's own message says why
        raise ConnectionError(f"rank {rank}: another rank stopped, so a collective failed; that rank's "
                              f"message says why") from e
    finally:
        dist.destroy_process_group()


def eval_loader(dataset, batch_size, workers, rank, world_size, device):
    """This rank's share of an evaluation set: every world_size-th sample and no padding (a
    DistributedSampler would pad with duplicates), so that metric sums added over the ranks are
    the single-process ones exactly. Its own generator: the loader then draws nothing from the
    global RNG, whose stream (MC Dropout's masks, a resumed run's) stays the caller's."""
    return DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), batch_size,
                      num_workers=workers, pin_memory=device.type == 'cuda', generator=torch.Generator())


def default_workers():
    """Data loader processes per rank: the cores this process may use, shared by the ranks
    torchrun started on this machine, at most 4 (PyTorch warns about more than the cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(0, min(4, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


# ---------------------------------------------------------------------------------------------
# Precision

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast_dtype(precision, device):
    """--precision -> the autocast dtype, None for fp32 (see the module docstring)."""
    if precision != 'auto':
        return DTYPES[precision]
    if device.type != 'cuda':
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, dtype):
    """Autocast to dtype on device, or nothing for None (fp32)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def sync(device):
    """Wait for the device's queued work: around a timed region on a GPU."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Progress


def format_duration(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


class Progress:
    """One line per `every` seconds: 'what 120/654 | 3.2 images/s | eta 2m40s'."""

    def __init__(self, what, total, unit='images', every=10.0, show=True):
        self.what, self.total, self.unit, self.every, self.show = what, total, unit, every, show
        self.start = self.shown = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if not self.show or (now - self.shown < self.every and done < self.total):
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        eta = format_duration((self.total - done) / rate) if rate > 0 else '?'
        print(f'{self.what} {done}/{self.total} | {rate:.2f} {self.unit}/s | eta {eta}', flush=True)
