"""The CUDA paths: every one of them runs here, where a GPU is present (`pytest -m gpu`), and the
whole file skips cleanly without one. They check that each path runs and agrees with the CPU,
not how fast it is (bench.py measures that; gpu_check.sh runs this file on a GPU)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bench
import evaluate
import losses
import mit
import train
import uq
from heads import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--data', 'synthetic', '--backbone', 'b0', '--synthetic-train', '16', '--synthetic-val', '4',
        '--synthetic-size', '64', '64', '--batch-size', '4', '--lr', '6e-4', '--workers', '2',
        '--log-every', '1', '--eval-every', '0', '--device', 'cuda']


@pytest.fixture(autouse=True)
def exact_fp32():
    # comparisons with the CPU in fp32: no TF32 in matmuls and convolutions
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def close(a, b, rel=1e-3):
    return (a.cpu() - b.cpu()).abs().max() <= rel * b.abs().max() + 1e-5


@pytest.mark.parametrize('method', ['none', 'dse', 'de-batched', 'de-looped'])
def test_predict_on_the_gpu_equals_the_cpu(method):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 128)
    if method.startswith('de'):
        members = [build_model('segdepthformer', 'b0', 6) for _ in range(3)]
        model = lambda device: uq.DeepEnsemble([m.to(device) for m in members], batched=method == 'de-batched')
        method = 'de'
    else:
        net = build_model('dse' if method == 'dse' else 'segdepthformer', 'b0', 6, **(
            {'num_members': 3} if method == 'dse' else {}))
        model = lambda device: net.to(device)
    cpu = uq.predict(model('cpu'), x, method, decompose=True)
    gpu = uq.predict(model('cuda'), x.cuda(), method, decompose=True)
    for key in ('probs', 'entropy', 'depth_mean', 'depth_var', 'mutual_information', 'epistemic_var'):
        assert close(getattr(gpu, key), getattr(cpu, key)), key


def test_the_deep_ensemble_batches_on_the_gpu_by_default():
    members = [build_model('segdepthformer', 'b0', 6).cuda() for _ in range(2)]
    assert uq.DeepEnsemble(members).batched


def test_mc_dropout_on_the_gpu():
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 6).cuda().eval()
    x = torch.randn(2, 3, 64, 96, device='cuda')
    draws = uq.mc_dropout_samples(model, x, samples=4, dropout=0.5)  # one batch of 4 on a GPU
    assert draws['seg_logits'].shape == (4, 2, 6, 64, 96)
    assert not torch.allclose(draws['seg_logits'][0], draws['seg_logits'][1])
    pred = uq.predict(model, x, 'mcd', samples=4, dropout=0.5)
    assert torch.isfinite(pred.entropy).all() and (pred.depth_var > 0).all()
    y = mit.Dropout(0.2)(torch.ones(1_000_000, device='cuda'))  # torch's fused kernel, not cpu_dropout
    assert abs((y > 0).float().mean().item() - 0.8) < 0.005


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_a_training_step_in_half_precision(precision):
    # autocast, GradScaler (fp16 only), fused AdamW, channels_last input
    torch.manual_seed(0)
    device = torch.device('cuda')
    model = build_model('segdepthformer', 'b0', 6).to(device).train()
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
    x = torch.randn(4, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    label, depth = torch.randint(6, (4, 64, 64), device=device), torch.rand(4, 64, 64, device=device) * 5 + 0.5
    before = [p.detach().clone() for p in model.parameters()]
    # GradScaler starts at a scale of 2^16, at which this model's fp16 gradients overflow: it skips
    # those steps and halves the scale (three times on a CPU with fp16 autocast), so take six
    for _ in range(6):
        with torch.autocast('cuda', dtype=dtype):
            loss, _ = losses.segdepth_loss(model(x), label, depth)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_with_amp_and_compile(tmp_path):
    train.main([*TINY, '--epochs', '1', '--precision', 'auto', '--compile', '--out', str(tmp_path)])
    ckpt = torch.load(tmp_path / 'last.pt', weights_only=True)
    assert ckpt['step'] == 4 and 'cuda' in ckpt['rng'][0]
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())


def _sync_batchnorm_rank(rank, world_size, port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('nccl', rank=rank, world_size=world_size)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model('segdepthformer', 'b0', 6)).cuda().train()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    model = DDP(model, device_ids=[rank])
    x = torch.randn(2, 3, 64, 64, device='cuda')
    loss, _ = losses.segdepth_loss(model(x), torch.randint(6, (2, 64, 64), device='cuda'),
                                   torch.rand(2, 64, 64, device='cuda') + 1, across_ranks=True)
    loss.backward()
    dist.destroy_process_group()


def test_sync_batchnorm_under_ddp():
    # as many ranks as GPUs, up to 2 (NCCL takes one GPU per rank)
    world_size = min(2, torch.cuda.device_count())
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sync_batchnorm_rank, args=(world_size, port), nprocs=world_size)


def test_evaluate_on_the_gpu_with_pinned_memory_and_bf16(tmp_path):
    torch.manual_seed(0)
    model = build_model('segdepthformer', 'b0', 6)
    torch.save({'model': model.state_dict(), 'config': model.config}, tmp_path / 'm.pt')
    result = evaluate.main([str(tmp_path / 'm.pt'), '--synthetic-val', '4', '--synthetic-size', '64', '64',
                            '--device', 'cuda', '--workers', '2', '--warmup', '1', '--precision', 'bf16'])
    assert result['settings']['device'].startswith('cuda') and result['time_ms']['n'] == 3


SMALL = ['--backbone', 'b0', '--size', '64', '96', '--num-classes', '6', '--members', '2', '--samples', '2',
         '--warmup', '3', '--iters', '3']


def test_bench_times_with_cuda_events_and_measures_cuda_memory():
    rows = bench.main([*SMALL, '--precision', 'bf16', '--channels-last', '--rows', 'mcd', 'dse', 'de', 'de-looped'])
    for r in rows:
        assert r['latency_ms_mean'] > 0 and r['peak_bytes'] > 0


def test_bench_compiles_a_cuda_graph():
    rows = bench.main([*SMALL, '--precision', 'bf16', '--compile', '--compile-mode', 'reduce-overhead',
                       '--rows', 'segdepthformer'])
    assert rows[0]['latency_ms_mean'] > 0


def test_torchrun_on_the_gpus(tmp_path):
    world_size = min(2, torch.cuda.device_count())
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                          f'--nproc_per_node={world_size}', 'train.py', *TINY, '--epochs', '1',
                          '--batch-size', '4', '--out', str(tmp_path / 'ddp')], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f'on {world_size} rank(s), cuda' in run.stdout
