"""plumbing.py: atomic writes that survive a full disk, output checks, checkpoint reading."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A disk that fills up after 64 KiB: the file-size limit makes every write beyond it fail with
# EFBIG, as ENOSPC would (SIGXFSZ ignored, so the write returns the error instead of killing us)
FULL_DISK = '''
import resource, signal, sys, torch
import plumbing
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    plumbing.save_torch({'weights': torch.zeros(100_000)}, sys.argv[1])
except OSError as e:
    print(e)
    sys.exit(3)
'''


def test_a_full_disk_names_the_file_removes_the_temporary_and_keeps_the_old_file(tmp_path):
    path = tmp_path / 'last.pt'
    plumbing.save_torch({'weights': torch.ones(3)}, path)
    run = subprocess.run([sys.executable, '-c', FULL_DISK, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 3, run.stdout + run.stderr
    assert f'could not write {path}' in run.stdout and 'MiB free on its disk' in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pt']  # no temporary file keeps the space
    assert torch.equal(torch.load(path, weights_only=True)['weights'], torch.ones(3))  # the old file, whole


# The page faults of a 64 MiB tensor written and freed 16 times in a fresh process, each time's,
# with glibc's own handling of freed memory or with keep_freed_memory's
TENSOR_FAULTS = '''
import resource, sys, torch
import plumbing
if sys.argv[1] == 'keep':
    assert plumbing.keep_freed_memory()
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2**24)
    del x
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def transparent_huge_pages():
    try:
        return '[always]' in open('/sys/kernel/mm/transparent_hugepage/enabled').read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith('linux') or transparent_huge_pages(),
                    reason='glibc (Linux), with 4 KiB pages for a 64 MiB block')
def test_keep_freed_memory_serves_a_tensor_from_freed_pages():
    # 64 MiB is 16384 pages of 4 KiB: glibc maps a block that large afresh every time, and each
    # page faults in at its first write. Kept, a tensor comes from the pages of freed ones: not
    # at once, as PyTorch's 64-byte aligned blocks do not fit exactly into a freed one of their
    # size, but after a few (the heap then holds free space around it); a few faults remain for
    # the interpreter's own small allocations.
    faults = {}
    for mode in ('default', 'keep'):
        run = subprocess.run([sys.executable, '-c', TENSOR_FAULTS, mode], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        faults[mode] = [int(n) for n in run.stdout.split()]
    assert min(faults['default']) > 8000 and min(faults['keep'][-4:]) < 1000, faults


def test_save_atomic_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append('fsync') or real_fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append('rename') or real_replace(a, b))
    plumbing.write_json({'a': 1}, tmp_path / 'r.json')
    assert events == ['fsync', 'rename', 'fsync']  # the file, the rename, the folder's entry
    assert json.loads((tmp_path / 'r.json').read_text()) == {'a': 1}


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    def write(f):
        f.write(b'half')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        plumbing.save_atomic(tmp_path / 'x.bin', write)
    assert list(tmp_path.iterdir()) == []


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(OSError, match='r.json'):
        plumbing.write_json({'miou': float('nan')}, tmp_path / 'r.json')
    assert list(tmp_path.iterdir()) == []
    plumbing.write_json(plumbing.json_safe({'miou': float('nan')}), tmp_path / 'r.json')
    assert json.loads((tmp_path / 'r.json').read_text()) == {'miou': None}


def test_check_output(tmp_path):
    plumbing.check_output(tmp_path / 'new' / 'deeper' / 'r.json', '--json')  # folders are made
    assert (tmp_path / 'new' / 'deeper').is_dir()
    (tmp_path / 'r.json').write_text('{}')
    with pytest.raises(FileExistsError, match='--json .*r.json already holds a result; pass --overwrite'):
        plumbing.check_output(tmp_path / 'r.json', '--json')
    plumbing.check_output(tmp_path / 'r.json', '--json', overwrite=True)
    plumbing.check_output(tmp_path / 'empty', '--out', folder=True)  # an empty folder holds nothing
    with pytest.raises(FileExistsError, match='--out'):
        plumbing.check_output(tmp_path, '--out', folder=True)
    with pytest.raises(OSError, match='--json .*cannot write'):
        plumbing.check_output(tmp_path / 'r.json' / 'x.json', '--json')


def test_load_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        plumbing.load_file(tmp_path / 'nope.pt')
    (tmp_path / 'half.pt').write_bytes(b'PK\x03\x04 truncated zip')
    with pytest.raises(ValueError, match='half.pt: not a readable PyTorch checkpoint'):
        plumbing.load_file(tmp_path / 'half.pt')
    # one line each, with torch's reason and without its advice to load with weights_only=False
    (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
    (tmp_path / 'empty.pt').write_bytes(b'')
    torch.save(torch.nn.Linear(2, 2), tmp_path / 'module.pt')  # a pickled module, not a state dict
    reasons = {'notes.txt': 'Unsupported', 'empty.pt': 'EOFError', 'module.pt': 'Unsupported'}  # torch's words
    for name, reason in reasons.items():
        with pytest.raises(ValueError) as error:
            plumbing.load_file(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f'{tmp_path / name}: not a readable PyTorch checkpoint (') and reason in message
        assert '\n' not in message and 'weights_only' not in message


def test_precision_flag():
    cpu = torch.device('cpu')
    assert plumbing.autocast_dtype('auto', cpu) is None and plumbing.autocast_dtype('fp32', cpu) is None
    assert plumbing.autocast_dtype('bf16', cpu) == torch.bfloat16
    assert plumbing.autocast_dtype('fp16', cpu) == torch.float16


def test_default_workers_fit_the_machine(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert plumbing.default_workers() == min(4, cores)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(cores))  # as many ranks on this machine as cores
    assert plumbing.default_workers() == 1


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    script = lambda *args, **env: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                                                 env={**os.environ, **env}, timeout=120)
    mistake = script('train.py', '--data', 'nyuv2', '--out', str(tmp_path / 'run'))
    assert mistake.returncode == 1
    assert mistake.stderr == 'train.py: --data nyuv2 needs --root, the data set directory\n'
    shown = script('train.py', '--data', 'nyuv2', '--out', str(tmp_path / 'run'), EMUFORMER_TRACEBACK='1')
    assert shown.returncode == 1 and 'Traceback' in shown.stderr and 'needs --root' in shown.stderr
    bug = script('-c', 'import plumbing; plumbing.entry_point(lambda: [][0])')
    assert bug.returncode == 1 and 'Traceback' in bug.stderr and 'IndexError' in bug.stderr
    status = script('-c', 'import plumbing; plumbing.entry_point(lambda: 3)')
    assert status.returncode == 3 and status.stderr == ''
    assert not (tmp_path / 'run').exists()  # refused before anything was made


def write_safetensors(path, tensors):
    """The format, from its definition: an 8-byte little-endian header length, the JSON header,
    then each tensor's little-endian bytes at the offsets the header gives."""
    names = {torch.float32: 'F32', torch.int64: 'I64', torch.bfloat16: 'BF16', torch.bool: 'BOOL'}
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b''
        header[name] = {'dtype': names[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, 'little') + text + b''.join(blobs))


def test_a_state_dict_is_read_from_what_the_file_holds_not_its_name(tmp_path):
    tensors = {'a.weight': torch.randn(3, 4), 'steps': torch.arange(5), 'half': torch.randn(2, 2).bfloat16(),
               'empty': torch.zeros(0, 3), 'flag': torch.tensor(True)}
    write_safetensors(tmp_path / 'weights.pth', tensors)  # a misleading name
    torch.save({'state_dict': tensors}, tmp_path / 'weights.safetensors')
    for name in ('weights.pth', 'weights.safetensors'):
        read = plumbing.read_state_dict(tmp_path / name)
        assert read.keys() == tensors.keys()
        assert all(read[k].dtype == v.dtype and torch.equal(read[k], v) for k, v in tensors.items())
    folder = tmp_path / 'hub'  # a folder as Hugging Face's save_pretrained writes it
    folder.mkdir()
    write_safetensors(folder / 'model.safetensors', tensors)
    (folder / 'config.json').write_text('{"hidden_sizes": [32, 64, 160, 256]}')
    assert torch.equal(plumbing.read_state_dict(folder)['a.weight'], tensors['a.weight'])
    assert plumbing.read_config(folder)['hidden_sizes'] == [32, 64, 160, 256]
    with pytest.raises(FileNotFoundError, match='without model.safetensors or pytorch_model.bin'):
        plumbing.read_state_dict(tmp_path)
    (tmp_path / 'torn.safetensors').write_bytes((tmp_path / 'weights.pth').read_bytes()[:-7])
    with pytest.raises(ValueError, match='torn.safetensors: not a readable safetensors file'):
        plumbing.read_state_dict(tmp_path / 'torn.safetensors')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
    with pytest.raises(ValueError, match='tensor.pt: holds no state dict'):
        plumbing.read_state_dict(tmp_path / 'tensor.pt')


def test_the_safetensors_reader_agrees_with_the_safetensors_package(tmp_path):
    safetensors = pytest.importorskip('safetensors.torch')  # installed with transformers
    tensors = {'w': torch.randn(4, 5), 'i': torch.arange(7), 'b': torch.randn(3).bfloat16()}
    safetensors.save_file(tensors, tmp_path / 'w.safetensors')
    read = plumbing.read_state_dict(tmp_path / 'w.safetensors')
    assert all(torch.equal(read[k], v) for k, v in tensors.items())


def test_load_strict_refuses_non_finite_weights():
    layer = torch.nn.Linear(2, 2)
    state = {'weight': torch.tensor([[1.0, float('nan')], [0.0, 1.0]]), 'bias': torch.zeros(2)}
    with pytest.raises(ValueError, match=r'bad.pt: 1 tensors hold NaN or inf \(weight\)'):
        plumbing.load_strict(layer, state, 'bad.pt')


@pytest.mark.parametrize('kind,good,bad', [
    (plumbing.positive_int, {'1': 1, '12': 12}, ['0', '-4', '1.5', 'x', '']),
    (plumbing.natural_int, {'0': 0, '3': 3}, ['-1', '2.0', 'nan']),
    (plumbing.positive_float, {'1e-4': 1e-4, '2': 2.0}, ['0', '-2', 'nan', 'inf', 'x']),
    (plumbing.non_negative_float, {'0': 0.0, '0.5': 0.5}, ['-0.1', 'nan', '-inf']),
    (plumbing.rate, {'0': 0.0, '0.2': 0.2, '0.999': 0.999}, ['1', '1.5', '-0.1', 'nan'])])
def test_numeric_options_are_checked_where_they_are_parsed(kind, good, bad, capsys):
    parser = argparse.ArgumentParser(prog='script.py')
    parser.add_argument('--value', type=kind)
    for text, value in good.items():
        assert parser.parse_args(['--value', text]).value == value
    for text in bad:
        with pytest.raises(SystemExit):
            parser.parse_args([f'--value={text}'])
        assert f'argument --value: {text} is not ' in capsys.readouterr().err


# bad values of the options several scripts share, and the line each script must answer with
SHARED_OPTIONS = [('--batch-size', '0', '0 is not an integer >= 1'),
                  ('--workers', '-1', '-1 is not an integer >= 0'),
                  ('--samples', '0', '0 is not an integer >= 1'),
                  ('--dropout', '1.5', '1.5 is not a rate in [0, 1)'),
                  ('--max-depth', 'nan', 'nan is not a number > 0'),
                  ('--synthetic-val', '0', '0 is not an integer >= 1'),
                  ('--precision', 'fp8', "invalid choice: 'fp8'")]


def shared_option_cases():
    """(script, option, value, message) for each script that has the option."""
    for script in ('train', 'distill', 'evaluate', 'calibrate', 'predict', 'bench'):
        options = __import__(script).get_parser()._option_string_actions
        yield from ((script, *case) for case in SHARED_OPTIONS if case[0] in options)


@pytest.mark.parametrize('script, option, value, message', list(shared_option_cases()))
def test_an_option_the_scripts_share_is_checked_alike_in_each(script, option, value, message, capsys):
    parser = __import__(script).get_parser()
    positional = ['x.pt'] if any(not a.option_strings and a.nargs == '+' for a in parser._actions) else []
    with pytest.raises(SystemExit) as exit:
        parser.parse_args([*positional, option, value])
    assert exit.value.code == 2 and f'argument {option}: {message}' in capsys.readouterr().err
