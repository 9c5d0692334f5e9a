"""
Table 1 of the paper, measured: parameters, multiply-adds, latency and FPS of every model and
uncertainty method, for any backbone, input size, batch size and precision.

Each row times the full prediction with uncertainty, image batch in, `uq.Prediction` out
(mean softmax, entropy, depth mean and variance, all at the input size), through `uq.predict`,
except the encoder, 1/4-resolution, Hugging Face and onnxruntime rows, which say what they time:

    SegFormer, DepthFormer, SegDepthFormer   one network, method 'none'
    SegDepthFormer, plain forms             the same with the speed-ups of one pass off
                                            (PLAIN_FORMS), and with each alone off:
      plain upsampling                      F.interpolate and an add for heads.upsample's
                                            matrix products into the decoders' map
      plain folds                           the decoders' folds computed on every call, not
                                            kept (heads.kept_folds)
      plain softmax                         F.softmax over dim 1 for uq's channels_last one
      plain memory                          in a fresh process of its own, timed after the
                                            others, with glibc's own handling of freed memory,
                                            which the other rows keep for reuse instead
                                            (plumbing.keep_freed_memory)
    SegDepthFormer to 1/4 resolution        the same network up to its heads' outputs at 1/4
                                            resolution (model(x, full=False)): what is left of
                                            one pass is its full-resolution outputs
    SegDepthFormer, textbook decoder        the same network with the literal SegFormer
                                            decoder (heads.py), to see what the fold buys
    MC Dropout (T)                          SegDepthFormer, method 'mcd', T passes
    MC Dropout (T), plain dropout           the same with torch's own dropout in every layer
                                            (PLAIN_DROPOUT): what mit.cpu_dropout and
                                            heads.dropped_pointwise buy on a CPU (on a GPU
                                            both rows run torch's)
    MC Dropout (T), numpy's masks           the same with mit.cpu_dropout's masks made by
                                            numpy and torch, as without numba: what numba's
                                            kernel buys (the header says whether it runs; on
                                            a GPU, torch's dropout in both rows)
    decoder MC Dropout (T)                  SegDepthFormer, method 'mcd-decoder': the encoder
                                            once, T passes of the decoders with dropout on
    decoder MC Dropout (T), plain dropout   the same with torch's own Dropout2d: what
                                            heads.dropped_pointwise buys on a CPU
    test-time drop-path (T)                 SegDepthFormer, method 'drop-path': T whole passes
                                            with the encoder's stochastic depth on
    DSE (N)                                 Deep Sub-Ensemble, one encoder and N heads per task
    DE (N)                                  Deep Ensemble of N SegDepthFormers, built once, run
                                            the way uq.DeepEnsemble chooses for the device
    DE batched / DE looped (N)              the same, forced: vmap over the stacked weights, or
                                            a loop over the members
    EMUFormer                               the student: a SegDepthFormer, so it must cost
                                            the same (the paper's point)
    MiT encoder                             our encoder alone, model.backbone(x)
    HF SegFormer, HF encoder (--hf)         Hugging Face transformers' SegFormer with the same
                                            config, random init, for comparison
    SegDepthFormer, onnxruntime (--onnx)    the SegDepthFormer row's network (the same random
                                            init) exported by predict.py, its whole prediction
                                            with uncertainty run by onnxruntime on the CPU (its
                                            MACs: predict.FoldedNetwork's, fold matrices constant),
                                            and exported or run with one of the export's
                                            speed-ups off (PLAIN_EXPORT):
      plain decoder                         the fused map made whole, then each head's
                                            prediction layer on its channels (for
                                            predict.chunked_heads)
      plain outputs                         the softmax and entropy over dim 1 of the logits
                                            (predict.softmax_and_entropy) for the pixel rows
      plain flatten                         the exporter's own flatten, which reads each conv
                                            output's shape (for predict.onnx_flatten)
      plain threads                         onnxruntime's threads sleep between operators
                                            instead of spinning (predict.FAST_THREADS)

The samples of MC Dropout, the DSE's heads and the DE's members go the way uq.predict chooses
for the device: one pass at a time on a CPU, all at once on a GPU.

Timing: every row is built and gets `--warmup` untimed calls, then `--iters` rounds time one
call of each row in turn, under torch.inference_mode (rounds, so that a machine whose speed
drifts over minutes, a shared CPU, slows every row alike; with --compile each row is timed
right after its warm-up instead, since compiling the next row resets dynamo). The rows of
FRESH_PROCESS_ROWS are the exception: each is timed alone, after the others, in a fresh process
of its own, so a drift of the machine's speed between the two is not evened out as in rounds.
On the GPU each iteration sits between a pair of CUDA events and the elapsed times are read
after one synchronize at the end; on the CPU, which runs synchronously, it is time.perf_counter
around each call. Latency is the median over the timed calls (and their mean +- std), FPS =
batch / median.
`--precision bf16|fp16` runs under autocast (the weights stay fp32), `--channels-last` converts
networks and input, `--compile` compiles each row's whole timed step (`--compile-mode
reduce-overhead` records it as a CUDA graph, which removes launch overhead at batch 1).
"x single" is a row's latency over SegDepthFormer's in the same run.

Memory ("peak"): what one prediction needs at its peak beyond the networks' weights and the
input: CUDA's peak allocation on a GPU; on a CPU the peak resident memory of a fresh process
that runs the row (peak_memory), since an allocator that keeps freed memory would hide a peak
from a measurement inside this one.

Multiply-adds (MACs). Table 1's "FLOPs" are multiply-adds, attention included. Counted here:
every convolution, linear layer and matmul, attention's two matmuls QK^T and AV included
(2 * B * heads * N * N_kv * head_dim); not counted: softmax, norms, GELU, bias additions and
upsampling. With this convention the B2 models at 480x640 with 40 classes count to within 2% of
Table 1 (tests/test_bench.py checks it), and Hugging Face's SegFormer counts to the same as
ours; docs/results.md has the figures. Two columns:

    MACs paper      as the paper counts them: the textbook SegFormer decoder, whose 4E -> E
                    fuse conv at 1/4 resolution is most of the total; an ensemble or MC
                    Dropout costs N (T) single passes, a DSE one encoder and N pairs of heads
    MACs executed   what the timed step actually runs: the folded decoder of heads.py,
                    and the entropy's sum over classes, which runs as a batched matmul; of a
                    call after the first, as the timed calls are: the decoders' small W_i L_i
                    fold matmuls are then kept from the first (heads.kept_folds), except in
                    the batched Deep Ensemble, which folds its stacked members on every call

Both are counted by running the row's networks under torch.utils.flop_counter.FlopCounterMode
on the meta device: shapes only, no arithmetic, so even the Deep Ensemble takes a moment. There
the decoders' upsampling is F.interpolate, uncounted as all upsampling is; the same count run on
a CPU would also count the matrix products by which heads.upsample_by_matrices upsamples there
(count_macs knows their in-place form; tests/test_bench.py checks both counts).

Run (single process; a benchmark has nothing to gain from torchrun):

    python bench.py                                  # all rows, B2, 480x640, batch 1, fp32
    python bench.py --precision bf16 --compile --compile-mode reduce-overhead
    python bench.py --device cpu --threads 2 --warmup 1 --iters 9
    python bench.py --hf                             # + Hugging Face (pip install transformers)
    python bench.py --onnx --rows segdepthformer --device cpu   # + onnxruntime (pip install onnx onnxruntime)
    python bench.py --rows segdepthformer textbook encoder --json out/bench.json
    python bench.py --train --batch-size 8 --precision bf16   # training steps/s, folded vs textbook
"""

import argparse
import ctypes
import importlib.metadata
import json
import multiprocessing
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import heads
import losses
import mit
import plumbing
import predict
import uq

# ---------------------------------------------------------------------------------------------
# Counting multiply-adds

aten = torch.ops.aten


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs):
    # FlopCounterMode has formulas for SDPA's CUDA kernels, and on the meta device SDPA
    # decomposes into two counted bmm's, but the CPU kernel has no formula and would count 0.
    # q (B, heads, N, d), k (B, heads, N_kv, d), v (B, heads, N_kv, d_v): QK^T and AV
    B, h, N, d = q
    N_kv, d_v = k[2], v[3]
    return 2 * B * h * N * N_kv * (d + d_v)


def _mv_flops(a, x, *args, out_shape=None, **kwargs):
    # the fold's bias W_i b_i is a matrix-vector product, which FlopCounterMode skips; under
    # vmap (the batched Deep Ensemble) it becomes a counted bmm, so count it everywhere
    return 2 * a[0] * a[1]


def _baddbmm_flops(a, b, c, *args, out_shape=None, **kwargs):
    # the in-place baddbmm_ of heads.upsample_by_matrices, which FlopCounterMode skips (it has
    # the out-of-place baddbmm's formula only): (n, p) @ (p, m) per batch, into a
    return 2 * b[0] * b[1] * b[2] * c[2]


# formulas return FLOPs = 2 x MACs, FlopCounterMode's convention for matmuls and convs
EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops, aten.mv: _mv_flops,
                  aten.baddbmm_: _baddbmm_flops}


def count_macs(fn, x):
    """Multiply-adds of fn(x), called a second time as the timed calls are: convolutions,
    linear layers and matmuls, attention included."""
    # no_grad, not inference_mode: before torch 2.5 FlopCounterMode counts nothing under the latter
    with torch.no_grad():
        fn(x)
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
            fn(x)
    return counter.get_total_flops() // 2


def count_params(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# Timing

def time_fn(fns, x, iters, device):
    """`iters` rounds of one timed call of each of fns (already warmed up) -> per fn its
    latencies in milliseconds. In rounds, not one fn after the other: a machine whose speed
    drifts over minutes (a shared CPU) then slows every row alike, and their ratios hold."""
    if device.type == 'cuda':
        # kernels run asynchronously: events record when the GPU reaches each point, and one
        # synchronize at the end waits for all of them instead of stalling every call
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(iters)] for _ in fns]
        torch.cuda.synchronize()
        for i in range(iters):
            for fn, fn_events in zip(fns, events):
                fn_events[i][0].record()
                fn(x)
                fn_events[i][1].record()
        torch.cuda.synchronize()
        return [[start.elapsed_time(end) for start, end in fn_events] for fn_events in events]
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, fn_times in zip(fns, times):
            t0 = time.perf_counter()
            fn(x)
            fn_times.append(1e3 * (time.perf_counter() - t0))
    return times


def peak_memory(key, args, device, run, x):
    """The memory one prediction of row `key` needs at its peak beyond what is allocated before
    it (the networks' weights and the input), in bytes: on a GPU CUDA's peak allocation during
    run(x); on a CPU the peak resident memory of a fresh process running the row once
    (cpu_peak_memory), or None where /proc/self/clear_refs is missing (not Linux)."""
    if device.type == 'cuda':
        return cuda_peak(run, x)
    if not os.path.exists('/proc/self/clear_refs'):
        return None
    return in_fresh_process(cpu_peak_memory, key, args)


def in_fresh_process(fn, *args):
    """fn(*args) in a fresh Python process (spawned: nothing of this one's state carried over)."""
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(fn, args)


def cuda_peak(fn, x):
    """CUDA's peak allocation during fn(x), beyond what was allocated before it, in bytes."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_memory(key, args):
    """Run in a fresh process: build row `key`, predict once to settle, then once more between
    a reset of the process's peak resident memory (writing 5 to /proc/self/clear_refs resets
    VmHWM) and a reading of it. glibc is first told to give every block over 128 KiB a mapping
    of its own (mallopt(M_MMAP_THRESHOLD)), so that freed tensors go back to the system at once
    instead of staying in its heap, where a later tensor would reuse them unseen by the peak."""
    ctypes.CDLL('libc.so.6').mallopt(plumbing.M_MMAP_THRESHOLD, 128 * 1024)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cpu')
    torch.manual_seed(0)
    networks, step, _ = make_row(key, args, {}, device, for_peak=True)
    run = prepare(networks, step, args, device)
    x = torch.randn(args.batch_size, 3, *args.size)
    with torch.inference_mode():
        run(x)
        before = resident('VmRSS')
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        run(x)
    return resident('VmHWM') - before


def resident(field):
    """VmRSS (now) or VmHWM (the peak) of this process, in bytes."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def latency_stats(times, batch):
    """Mean +- std, and the median, which the ratios use: on a shared CPU one slow call (another
    process took the cores) moves a mean of five a long way, a median not."""
    mean, median = statistics.mean(times), statistics.median(times)
    return {'latency_ms_mean': mean, 'latency_ms_std': statistics.stdev(times), 'latency_ms_median': median,
            'fps': batch * 1e3 / median}


# ---------------------------------------------------------------------------------------------
# Rows

ROWS = {  # --rows key: the row's name in the table ({N}: members, {T}: samples)
    'segformer': 'SegFormer',
    'depthformer': 'DepthFormer',
    'segdepthformer': 'SegDepthFormer',
    'segdepthformer-plain': 'SegDepthFormer, plain forms',
    'segdepthformer-plain-upsample': 'SegDepthFormer, plain upsampling',
    'segdepthformer-plain-folds': 'SegDepthFormer, plain folds',
    'segdepthformer-plain-softmax': 'SegDepthFormer, plain softmax',
    'segdepthformer-plain-memory': 'SegDepthFormer, plain memory',
    'segdepthformer-quarter': 'SegDepthFormer to 1/4 resolution',
    'textbook': 'SegDepthFormer, textbook decoder',
    'mcd': 'MC Dropout (T={T})',
    'mcd-plain': 'MC Dropout (T={T}), plain dropout',
    'mcd-numpy': "MC Dropout (T={T}), numpy's masks",
    'mcd-decoder': 'decoder MC Dropout (T={T})',
    'mcd-decoder-plain': 'decoder MC Dropout (T={T}), plain dropout',
    'drop-path': 'test-time drop-path (T={T})',
    'dse': 'DSE (N={N})',
    'de': 'DE (N={N}), default path',
    'de-batched': 'DE batched (N={N})',
    'de-looped': 'DE looped (N={N})',
    'emuformer': 'EMUFormer',
    'encoder': 'MiT encoder',
    'hf': 'HF SegFormer',
    'hf-encoder': 'HF SegFormer encoder',
    'onnx': 'SegDepthFormer, onnxruntime',
    'onnx-plain-decoder': 'SegDepthFormer, onnxruntime, plain decoder',
    'onnx-plain-outputs': 'SegDepthFormer, onnxruntime, plain outputs',
    'onnx-plain-flatten': 'SegDepthFormer, onnxruntime, plain flatten',
    'onnx-plain-threads': 'SegDepthFormer, onnxruntime, plain threads',
}
HF_ROWS = ('hf', 'hf-encoder')


class Textbook(nn.Module):
    """A SegFormer/DepthFormer/SegDepthFormer whose forward runs the textbook decoder, so that
    uq.predict times it exactly like the folded one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, textbook=True)


def hf_segformer(backbone, num_classes):
    """Hugging Face's SegformerForSemanticSegmentation with our backbone's config (random init,
    its default decoder and attention implementation)."""
    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError:
        raise SystemExit("the Hugging Face rows need the optional package transformers, used only "
                         "for this comparison: python -m pip install transformers") from None
    cfg = mit.get_config(backbone)
    config = SegformerConfig(
        num_labels=num_classes, hidden_sizes=list(cfg.embed_dims), depths=list(cfg.depths),
        num_attention_heads=list(cfg.num_heads), sr_ratios=list(cfg.sr_ratios),
        mlp_ratios=[cfg.mlp_ratio] * 4, decoder_hidden_size=cfg.decoder_dim)
    return SegformerForSemanticSegmentation(config)


def onnx_session(network, arena):
    """An onnxruntime CPU session of predict.py's export of `network` (a predict.FoldedNetwork),
    made as predict.py makes it (predict.onnx_session), on as many threads as PyTorch's rows. Its
    memory arena (a cache of freed buffers, onnxruntime's default) is on for the timing and off
    in the fresh process that measures the peak (cpu_peak_memory), where a cache would hold the
    first call's buffers and hide the second call's peak."""
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit("the onnx row needs the optional packages onnx and onnxruntime: "
                         "python -m pip install onnx onnxruntime") from None
    return predict.onnx_session(onnxruntime, predict.onnx_bytes(network, {}), torch.get_num_threads(), arena)


# the rows of one pass with speed-ups switched off: row key -> the (module, flag) it sets False
PLAIN_FORMS = {'segdepthformer-plain': [(heads, 'FAST_UPSAMPLE'), (heads, 'FAST_FOLDS'), (uq, 'FAST_SOFTMAX')],
               'segdepthformer-plain-upsample': [(heads, 'FAST_UPSAMPLE')],
               'segdepthformer-plain-folds': [(heads, 'FAST_FOLDS')],
               'segdepthformer-plain-softmax': [(uq, 'FAST_SOFTMAX')]}
# the export's speed-ups switched off, likewise, while the network is traced and its session made
PLAIN_EXPORT = {'onnx-plain-decoder': [(predict, 'FAST_DECODER')],
                'onnx-plain-outputs': [(predict, 'FAST_OUTPUTS')],
                'onnx-plain-flatten': [(predict, 'FAST_FLATTEN')],
                'onnx-plain-threads': [(predict, 'FAST_THREADS')]}
# the rows of --onnx: the export, then the export with each of its speed-ups off
ONNX_ROWS = ('onnx', *PLAIN_EXPORT)


# the MC Dropout rows with dropout's speed-ups switched off, as PLAIN_FORMS
PLAIN_DROPOUT = {'mcd-plain': [(mit, 'FAST_DROPOUT'), (heads, 'FAST_DROPOUT2D')],
                 'mcd-numpy': [(mit, 'NUMBA_DROPOUT')],
                 'mcd-decoder-plain': [(heads, 'FAST_DROPOUT2D')]}


def plain_forms(flags, fn, *args, **kwargs):
    """fn(*args, **kwargs) with each (module, flag) of `flags` set False (a row of PLAIN_FORMS,
    PLAIN_DROPOUT or PLAIN_EXPORT)."""
    saved = [getattr(module, flag) for module, flag in flags]
    for module, flag in flags:
        setattr(module, flag, False)
    try:
        return fn(*args, **kwargs)
    finally:
        for (module, flag), value in zip(flags, saved):
            setattr(module, flag, value)


# rows timed in a fresh process of their own, after the others: row key -> the row it runs there.
# The fresh process has glibc's own handling of freed memory, which every other row, in a
# process that ran plumbing.keep_freed_memory (bench.py's entry_point), does without.
FRESH_PROCESS_ROWS = {'segdepthformer-plain-memory': 'segdepthformer'}


def fresh_process_latencies(key, args, device):
    """Run in a fresh process: build row `key` of FRESH_PROCESS_ROWS on `device`, warm it up and
    time it as the other rows are, but alone -> its latencies in milliseconds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    x = input_batch(args, device)
    run = warmed_up(key, args, {}, device, x)
    with torch.inference_mode():
        return time_fn([run], x, args.iters, device)[0]


def input_batch(args, device):
    """The timed calls' input: --batch-size random images of --size on `device`."""
    x = torch.randn(args.batch_size, 3, *args.size, device=device)
    return x.to(memory_format=torch.channels_last) if args.channels_last else x


def warmed_up(key, args, cache, device, x):
    """Row `key` built on `device` (seeded, as every row is), prepared, and given its --warmup
    untimed calls on x -> the step to time."""
    torch.manual_seed(0)
    with torch.device(device):
        networks, step, _ = make_row(key, args, cache, device)
    run = prepare(networks, step, args, device)
    with torch.inference_mode():
        for _ in range(args.warmup):
            run(x)
    return run


def make_row(key, args, cache, device, for_peak=False):
    """Build row `key` on the current default device -> (networks, step, paper_step); for_peak:
    to measure its peak memory (cpu_peak_memory), which changes only onnxruntime's session.

    step(x) is the timed prediction, with the chunking uq.predict chooses for `device` (the one
    timed, also when the row is built on the meta device to count). paper_step(x) runs the same
    networks the way Table 1 counts them (textbook decoder, N or T whole passes) and is only run
    to count MACs. cache keeps the Deep Ensemble's members, built once for its three rows.
    """
    build = lambda name, **kw: heads.build_model(name, args.backbone, args.num_classes, **kw).eval()
    T, N = args.samples, args.members
    chunk = {'samples': T, 'members': N} if uq.all_at_once(device) else {'samples': 1, 'members': 1}
    if key in ('segformer', 'depthformer', 'segdepthformer', 'emuformer', *FRESH_PROCESS_ROWS):
        model = build(FRESH_PROCESS_ROWS.get(key, 'segdepthformer' if key == 'emuformer' else key))
        return [model], lambda x: uq.predict(model, x, 'none'), Textbook(model)
    if key in PLAIN_FORMS:  # the plain forms where the speed-ups would run
        model = build('segdepthformer')
        return [model], lambda x: plain_forms(PLAIN_FORMS[key], uq.predict, model, x, 'none'), Textbook(model)
    if key == 'segdepthformer-quarter':  # encoder and decoders, not the full-resolution outputs
        model = build('segdepthformer')
        return [model], lambda x: model(x, full=False), Textbook(model)
    if key == 'textbook':
        model = Textbook(build('segdepthformer'))
        return [model], lambda x: uq.predict(model, x, 'none'), model
    if key in ('mcd', 'mcd-plain', 'mcd-numpy'):
        model = build('segdepthformer')
        # textbook passes have no per-call work, so T passes cost one batch of T images
        paper = lambda x: model(x.repeat(T, 1, 1, 1), textbook=True)
        return [model], lambda x: plain_forms(PLAIN_DROPOUT.get(key, []), uq.predict, model, x, 'mcd', T,
                                              chunk=chunk['samples']), paper
    if key in ('mcd-decoder', 'mcd-decoder-plain'):
        model = build('segdepthformer')

        def paper(x):  # one encoder pass, then T passes of both heads in their textbook form
            features = model.backbone(x)
            return [d(features) for _ in range(T) for d in (model.decode_head, model.depth_head)]
        return [model], lambda x: plain_forms(PLAIN_DROPOUT.get(key, []), uq.predict, model, x, 'mcd-decoder', T), paper
    if key == 'drop-path':
        model = build('segdepthformer')
        paper = lambda x: model(x.repeat(T, 1, 1, 1), textbook=True)  # T whole passes, as MC Dropout's
        return [model], lambda x: uq.predict(model, x, 'drop-path', samples=T), paper
    if key == 'dse':
        model = build('dse', num_members=N)

        def paper(x):  # one encoder pass, then every head in its textbook form
            features = model.backbone(x)
            return [d(features) for d in [*model.decode_heads, *model.depth_heads]]
        return [model], lambda x: uq.predict(model, x, 'dse', chunk=chunk['members']), paper
    if key in ('de', 'de-batched', 'de-looped'):
        if 'members' not in cache:
            cache['members'] = [build('segdepthformer') for _ in range(N)]
        members = cache['members']
        batched = {'de': uq.all_at_once(device), 'de-batched': True, 'de-looped': False}[key]  # 'de': DeepEnsemble's default
        ensemble = uq.DeepEnsemble(members, batched=batched)
        paper = lambda x: [m(x, textbook=True) for m in members]
        return members, lambda x: uq.predict(ensemble, x, 'de'), paper
    if key == 'encoder':
        model = mit.MixVisionTransformer(args.backbone).eval()
        return [model], model, model
    if key == 'hf':
        model = hf_segformer(args.backbone, args.num_classes).eval()

        def step(x):
            # HF returns logits at 1/4 resolution: upsample and summarize (softmax, entropy)
            # like our models do inside uq.predict, so both rows do the same work
            logits = model(pixel_values=x).logits
            up = F.interpolate(logits, x.shape[-2:], mode='bilinear', align_corners=False)
            return uq.summarize({'seg_logits': up.unsqueeze(0)})
        return [model], step, lambda x: model(pixel_values=x)
    if key == 'hf-encoder':
        model = hf_segformer(args.backbone, args.num_classes).segformer.eval()
        return [model], model, model
    if key in ONNX_ROWS:
        model = build('segdepthformer')
        network = predict.FoldedNetwork(model)
        if next(model.parameters()).is_meta:  # counted, not run: the exported graph, in PyTorch
            return [model], lambda x: plain_forms(PLAIN_EXPORT.get(key, []), network, x), Textbook(model)
        session = plain_forms(PLAIN_EXPORT.get(key, []), onnx_session, network, arena=not for_peak)
        return [model], lambda x: session.run(None, {'image': x.contiguous().numpy()}), Textbook(model)
    raise ValueError(f"unknown row {key!r}: expected one of {', '.join(ROWS)}")


def prepare(networks, step, args, device):
    """Apply --channels-last, --precision and --compile to a row built on `device`. (The batched
    Deep Ensemble's stacked weights are copies taken when it was built; vmap reshapes them into
    grouped convolutions anyway, so for it only the input's layout changes.)"""
    if args.channels_last:
        for m in networks:
            m.to(memory_format=torch.channels_last)
    dtype = plumbing.DTYPES[args.precision]

    def run(x):
        with plumbing.autocast(device, dtype):
            return step(x)
    # the whole step is compiled, not only the network: uq.predict checks the model's class
    # (a compiled wrapper would fail it), and the summary (softmax, entropy, variance) is
    # elementwise work that fuses into the network's last kernels
    return compile_fn(run, args.compile_mode) if args.compile else run


def compile_fn(fn, mode):
    # every row compiles the same code (run, uq.predict) around other networks, and dynamo
    # stops recompiling a function after a few variants and runs it eagerly: start afresh
    torch.compiler.reset()
    return torch.compile(fn, mode=mode)


def inference_rows(args, device):
    """Count, build, warm up and time every selected row (in rounds, time_fn; with --compile
    each row right after its warm-up, since compiling the next one resets dynamo), then measure
    each one's peak memory: one dict per row, in the order of ROWS."""
    keys = [k for k in ROWS if k in args.rows or (args.hf and k in HF_ROWS) or (args.onnx and k in ONNX_ROWS)]
    B, (H, W) = args.batch_size, args.size
    meta_x = torch.empty(B, 3, H, W, device='meta')
    x = input_batch(args, device)
    rows, runs, meta_cache, cache = [], [], {}, {}
    for key in keys:
        # counted on the meta device: shapes only, no memory, no arithmetic
        with torch.device('meta'):
            networks, step, paper_step = make_row(key, args, meta_cache, device)
        rows.append({'key': key, 'name': ROWS[key].format(N=args.members, T=args.samples),
                     'params': count_params(networks),
                     'macs_paper': count_macs(paper_step, meta_x), 'macs_executed': count_macs(step, meta_x)})
        if key in FRESH_PROCESS_ROWS:  # built and timed in a process of its own, after the others
            runs.append(None)
            continue
        runs.append(warmed_up(key, args, cache, device, x))
        if args.compile:
            with torch.inference_mode():
                rows[-1]['latencies_ms'] = time_fn(runs[-1:], x, args.iters, device)[0]
        print(f"  built {rows[-1]['name']}", flush=True)
    with torch.inference_mode():
        if not args.compile:
            timed = [(row, run) for row, run in zip(rows, runs) if run is not None]
            for (row, _), times in zip(timed, time_fn([run for _, run in timed], x, args.iters, device)):
                row['latencies_ms'] = times
        for row, run in zip(rows, runs):
            if run is None:
                row['latencies_ms'] = in_fresh_process(fresh_process_latencies, row['key'], args, device)
            peak = peak_memory(row['key'], args, device, run, x) if run is not None or device.type == 'cpu' else None
            row.update(latency_stats(row['latencies_ms'], B), peak_bytes=peak)
            print(f"  {row['name']}: {row['latency_ms_median']:.1f} ms", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Training steps

def make_train_step(args, device, dtype, compile_, memory_format, textbook, label, depth):
    """A fresh SegDepthFormer and its training step(x): forward and Eq. 7 loss (under autocast
    for bf16/fp16, compiled with compile_), backward, AdamW step."""
    torch.manual_seed(0)
    with torch.device(device):
        model = heads.build_model('segdepthformer', args.backbone, args.num_classes).train()
    model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, fused=device.type == 'cuda')
    # fp16 gradients can underflow, so fp16 scales the loss; bf16 has fp32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def loss_fn(x):
        with plumbing.autocast(device, dtype):  # forward and loss only; backward runs in the forward's dtypes
            return losses.segdepth_loss(model(x, textbook=textbook), label, depth)[0]
    loss_fn = compile_fn(loss_fn, args.compile_mode) if compile_ else loss_fn

    def step(x):
        scaler.scale(loss_fn(x)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return model, step


def train_rows(args, device):
    """Training-step throughput of SegDepthFormer, folded vs textbook decoder, in eager fp32 and
    in the chosen settings (--precision, --channels-last, --compile) when they differ from it."""
    B, (H, W) = args.batch_size, args.size
    x = torch.randn(B, 3, H, W, device=device)
    label = torch.randint(args.num_classes, (B, H, W), device=device)
    depth = torch.rand(B, H, W, device=device) * 9.5 + 0.5  # metres, all valid
    settings = [('fp32 eager', None, False, False)]
    if args.precision != 'fp32' or args.compile or args.channels_last:
        name = ', '.join([args.precision] + ['channels_last'] * args.channels_last
                         + [f'compiled ({args.compile_mode})' if args.compile else 'eager'])
        settings.append((name, plumbing.DTYPES[args.precision], args.compile, args.channels_last))
    rows = []
    for setting, dtype, compile_, channels_last in settings:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        xs = x.to(memory_format=memory_format)
        pair = []  # folded and textbook, timed in rounds (time_fn), or one after the other if compiled
        for textbook in (False, True):
            model, step = make_train_step(args, device, dtype, compile_, memory_format, textbook, label, depth)
            for _ in range(args.warmup):
                step(xs)
            pair.append((textbook, model, step, time_fn([step], xs, args.iters, device)[0] if compile_ else None))
        times = [t for *_, t in pair] if compile_ else time_fn([step for _, _, step, _ in pair], xs, args.iters, device)
        for (textbook, model, step, _), step_times in zip(pair, times):
            mean = statistics.mean(step_times)
            rows.append({'name': f"SegDepthFormer{', textbook' if textbook else ''} ({setting})",
                         'setting': setting, 'textbook': textbook, 'params': count_params([model]),
                         'step_ms_mean': mean, 'step_ms_std': statistics.stdev(step_times),
                         'images_per_s': B * 1e3 / mean, 'step_times_ms': step_times,
                         'peak_bytes': cuda_peak(step, xs) if device.type == 'cuda' else None})
            print(f"  {rows[-1]['name']}: {mean:.1f} ms/step", flush=True)
        del pair, model, step  # free these models and their optimizer states before the next are built
    return rows


# ---------------------------------------------------------------------------------------------
# Report

def latency_ratios(rows):
    """The comparisons the speed work is judged by: latency of the first row / the second
    (below 1: the first is faster), for the pairs whose rows were run."""
    latency = {r['key']: r['latency_ms_median'] for r in rows}
    pairs = [('segdepthformer', 'encoder'), ('segdepthformer-quarter', 'encoder'),
             ('segdepthformer', 'segdepthformer-quarter'), *[('segdepthformer', key) for key in [*PLAIN_FORMS, *FRESH_PROCESS_ROWS]],
             ('segdepthformer', 'textbook'), ('segformer', 'hf'),
             ('segdepthformer', 'hf'), ('encoder', 'hf-encoder'), ('mcd', 'segdepthformer'),
             ('mcd', 'mcd-plain'), ('mcd', 'mcd-numpy'), ('mcd-decoder', 'segdepthformer'), ('mcd-decoder', 'mcd-decoder-plain'), ('drop-path', 'segdepthformer'),
             ('dse', 'segdepthformer'), ('de', 'segdepthformer'),
             ('de-batched', 'segdepthformer'), ('de-looped', 'segdepthformer'), ('de-batched', 'de-looped'),
             ('onnx', 'segdepthformer'), *[('onnx', key) for key in PLAIN_EXPORT]]
    names = {r['key']: r['name'] for r in rows}
    return {f"{names[a]} / {names[b]}": latency[a] / latency[b]
            for a, b in pairs if a in latency and b in latency}


def print_inference(rows, ratios, header):
    print(header)
    print("  params: every parameter of the networks a row runs (a Deep Ensemble: all members)")
    print("  MACs paper: multiply-adds of convs, linears and matmuls incl. attention's QK^T and AV "
          "(Table 1's 'FLOPs'), textbook decoder, N x single for DE, T x single for MCD, "
          "encoder + N x heads for DSE; softmax, norms, GELU, biases, upsampling not counted")
    print("  MACs executed: the same count of what a timed call runs (folded decoder, whose W_i L_i fold matmuls "
          "the first call makes and the next keep, and the entropy's sum over classes, which runs as a matmul)")
    print("  latency: median (mean +- std) over the timed calls; x single: median / SegDepthFormer's "
          "median in this run; peak: memory of one call beyond the "
          "weights (see peak_memory)")
    single = next((r['latency_ms_median'] for r in rows if r['key'] == 'segdepthformer'), None)
    width = max([34] + [len(r['name']) + 2 for r in rows])  # the rows' names, in one column
    print(f"{'row':<{width}}{'params (M)':>11}{'MACs paper (G)':>16}{'MACs exec (G)':>15}"
          f"{'latency (ms)':>28}{'x single':>10}{'FPS':>9}{'peak (MiB)':>12}")
    for r in rows:
        latency = f"{r['latency_ms_median']:.1f} ({r['latency_ms_mean']:.1f} +- {r['latency_ms_std']:.1f})"
        times = f"{r['latency_ms_median'] / single:.2f}" if single else '-'
        peak = '-' if r['peak_bytes'] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{r['name']:<{width}}{r['params'] / 1e6:>11.2f}{r['macs_paper'] / 1e9:>16.2f}"
              f"{r['macs_executed'] / 1e9:>15.2f}{latency:>28}{times:>10}{r['fps']:>9.2f}{peak:>12}")
    for name, ratio in ratios.items():
        print(f"latency {name}: {ratio:.3f} ({1 / ratio:.2f}x the speed)")


def throughput_ratios(rows):
    """images/s of the folded SegDepthFormer / its textbook form, in each setting and, for the
    chosen setting, against the textbook form in eager fp32 (the training target's baseline)."""
    speed = {(r['setting'], r['textbook']): r['images_per_s'] for r in rows}
    ratios = {}
    for setting in dict.fromkeys(r['setting'] for r in rows):
        ratios[f"folded / textbook ({setting})"] = speed[setting, False] / speed[setting, True]
        if setting != 'fp32 eager':
            baseline = speed['fp32 eager', True]
            ratios[f"folded ({setting}) / textbook (fp32 eager)"] = speed[setting, False] / baseline
    return ratios


def print_train(rows, ratios, header):
    print(header)
    print(f"{'training step':<52}{'params (M)':>11}{'ms/step':>22}{'images/s':>10}{'peak (MiB)':>12}")
    for r in rows:
        ms = f"{r['step_ms_mean']:.1f} +- {r['step_ms_std']:.1f}"
        peak = '-' if r['peak_bytes'] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{r['name']:<52}{r['params'] / 1e6:>11.2f}{ms:>22}{r['images_per_s']:>10.2f}{peak:>12}")
    for name, ratio in ratios.items():
        print(f"images/s {name}: {ratio:.2f}x")


# ---------------------------------------------------------------------------------------------


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--backbone', default='b2', choices=list(mit.CONFIGS), help="MiT encoder (Table 1: b2)")
    p.add_argument('--size', nargs=2, type=plumbing.positive_int, default=[480, 640], metavar=('H', 'W'),
                   help="input size (NYUv2 as in Table 1: 480 640)")
    p.add_argument('--num-classes', type=plumbing.positive_int, default=40, help="segmentation classes (NYUv2: 40)")
    p.add_argument('--batch-size', type=plumbing.positive_int, default=1, help="images per step (FPS = batch size / latency)")
    p.add_argument('--rows', nargs='+', default=[k for k in ROWS if k not in HF_ROWS + ONNX_ROWS],
                   choices=list(ROWS), metavar='ROW',
                   help=f"rows to run, of: {', '.join(ROWS)} (default: all but hf* and onnx*)")
    p.add_argument('--members', type=plumbing.positive_int, default=10, help="N: Deep Ensemble members, DSE heads per task")
    p.add_argument('--samples', type=plumbing.positive_int, default=10, help="T: samples of mcd, mcd-decoder and drop-path (their passes)")
    p.add_argument('--hf', action='store_true',
                   help="add the rows hf and hf-encoder: Hugging Face transformers' SegFormer "
                        "(an optional package)")
    p.add_argument('--onnx', action='store_true',
                   help=f"add the rows {', '.join(ONNX_ROWS)}: SegDepthFormer exported to ONNX, run "
                        "by onnxruntime on the CPU, and with each of the export's speed-ups off "
                        "(optional packages onnx, onnxruntime)")
    p.add_argument('--train', action='store_true',
                   help="time training steps of SegDepthFormer (folded vs textbook) instead of the table")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   choices=['cpu', 'cuda'], help="default: cuda if available")
    p.add_argument('--threads', type=plumbing.positive_int, help="torch.set_num_threads (CPU); default: PyTorch's choice")
    p.add_argument('--precision', default='auto', choices=plumbing.PRECISIONS,
                   help="bf16/fp16: autocast, the weights stay fp32; auto: bf16 (fp16 without bf16) on a "
                        "GPU, fp32 on a CPU")
    p.add_argument('--channels-last', action='store_true', help="channels_last networks and input")
    p.add_argument('--compile', action='store_true', help="torch.compile each timed step")
    p.add_argument('--compile-mode', default='default',
                   choices=['default', 'reduce-overhead', 'max-autotune'],
                   help="torch.compile mode (reduce-overhead: CUDA graphs, for small batches on the GPU)")
    p.add_argument('--warmup', type=plumbing.natural_int, default=5, help="untimed iterations first (compiling happens here)")
    p.add_argument('--iters', type=plumbing.positive_int, default=20, help="timed iterations (at least 2, for a std)")
    p.add_argument('--json', metavar='PATH', help="also write settings and rows to this JSON file")
    return p


def parse_args(argv):
    p = get_parser()
    args = p.parse_args(argv)
    # auto becomes the precision it means on this device, which the report then names
    dtype = plumbing.autocast_dtype(args.precision, torch.device(args.device))
    args.precision = next(name for name, d in plumbing.DTYPES.items() if d == dtype)
    if args.iters < 2:
        p.error("--iters must be at least 2 (the std needs two timings)")
    if args.train and args.hf:
        p.error("--hf compares inference; --train times SegDepthFormer only")
    if args.onnx or any(k in ONNX_ROWS for k in args.rows):
        if args.train or args.device != 'cpu' or args.precision != 'fp32' or args.compile:
            p.error("the onnx row times onnxruntime's fp32 CPU inference: use it with --device cpu, "
                    "fp32, without --compile or --train")
    if args.compile_mode != 'default' and not args.compile:
        p.error("--compile-mode needs --compile")
    return args


def main(argv=None):
    """Run the benchmark; returns the rows (a list of dicts, as written to --json)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    (H, W), dtype = args.size, args.precision
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    # numba's version where its kernel makes MC Dropout's masks (mit.dropout_kernel), asked on a
    # CPU only: on a GPU torch makes them, and the run does not import numba
    numba_version = importlib.metadata.version('numba') if device.type == 'cpu' and mit.dropout_kernel() else None
    masks = '' if device.type == 'cuda' else f', numba {numba_version}' if numba_version else ', without numba'
    header = (f"{name} ({torch.get_num_threads()} CPU threads), {dtype}"
              f"{', channels_last' if args.channels_last else ''}"
              f"{f', compiled ({args.compile_mode})' if args.compile else ', eager'}, "
              f"MiT-{args.backbone.upper()}, {H}x{W}, batch {args.batch_size}, {args.num_classes} classes, "
              f"torch {torch.__version__}{masks}; "
              f"{'CUDA events' if device.type == 'cuda' else 'wall clock'}, "
              f"{args.warmup} warm-up + {args.iters} timed iterations")
    settings = {**vars(args), 'device_name': name, 'threads': torch.get_num_threads(),
                'torch': torch.__version__, 'numba': numba_version}
    if args.train:
        rows = train_rows(args, device)
        ratios = throughput_ratios(rows)
        print_train(rows, ratios, header)
        report = {'settings': settings, 'train_rows': rows, 'throughput_ratios': ratios}
    else:
        rows = inference_rows(args, device)
        ratios = latency_ratios(rows)
        print_inference(rows, ratios, header)
        report = {'settings': settings, 'rows': rows, 'latency_ratios': ratios}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return rows


if __name__ == '__main__':
    plumbing.entry_point(main)
