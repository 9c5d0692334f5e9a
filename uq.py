"""
Uncertainty quantification for joint semantic segmentation and monocular depth estimation:
the methods and the Prediction they make (Landgraf et al., Sections 2.2, 3.2-3.3 and 4).

A single network gives one prediction and, at best, its aleatoric uncertainty: the entropy of
its softmax (Eq. 3) and the variance its depth head learned through the GNLL loss (Eq. 5, 6).
What it cannot see is its own epistemic uncertainty, how much the prediction would change had
the network been trained differently. The three methods of the paper estimate it by drawing
several predictions ("samples") and looking at how they disagree:

    MC Dropout (mcd)            one network; dropout stays on at test time (rate 0.2 or 0.5) and
                                T = 10 forward passes see T different thinned networks
                                (Gal & Ghahramani; mc_dropout switches every dropout layer on)
    Deep Sub-Ensemble (dse)     one shared encoder with N = 10 decoder heads per task, trained
                                one head per batch (Valdenegro-Toro); the encoder runs once and
                                the heads as grouped computations (heads.DeepSubEnsemble)
    Deep Ensemble (de)          N = 10 whole networks trained from different random inits and
                                data orders (Lakshminarayanan et al.); the state of the art, at
                                N times the cost (DeepEnsemble: a loop on a CPU, one vmapped
                                model over the stacked weights on a GPU)
    none                        the single network as it is: its own entropy and variance

and two cheap baselines a reviewer asks EMUFormer to beat, both T samples of one network:

    decoder MC Dropout          dropout on the decoders only (their Dropout2d): the encoder runs
      (mcd-decoder)             once, the T samples cost T decoder passes
    test-time drop-path         MiT's stochastic depth (DropPath) kept on at inference: each
      (drop-path)               sample skips a random set of the encoder's residual branches, at
                                the rates the network was trained with (train.py --drop-path;
                                with 0 every sample is the same network)

Every method yields samples, one output dict at a time, and a Summary accumulates them into
the same `Prediction` (paper Section 4, "Predictions" and "Uncertainty"):

    segmentation   mean softmax   q = 1/S sum_t softmax(z_t)
                   prediction     argmax_c q_c
                   uncertainty    entropy H(q) = -sum_c q_c log q_c       (Eq. 3)
    depth          mean           mu_bar = 1/S sum_t mu_t, with mu_t = ReLU(.) already (Eq. 4)
                   uncertainty    sigma^2 = 1/S sum_t s_t^2 + 1/S sum_t (mu_t - mu_bar)^2   (Eq. 10)

Eq. 10 is the law of total variance for an equal mixture of the S Gaussians N(mu_t, s_t^2):
the first term is the aleatoric part (the mean of the variances each sample predicts), the
second the epistemic part (how much the samples' means disagree); with S = 1 it is the head's
own variance. Section 2.2 splits the segmentation uncertainty the same way: the total H(q) is
the mean of the samples' own entropies (aleatoric) plus the mutual information between the
prediction and the sample (epistemic); predict(..., decompose=True) keeps all four parts.

How many samples are in memory at once depends on the device (all_at_once). On a CPU every
method computes one sample at a time, so one sample sits at full resolution. On a GPU the
samples are computed together: the DSE's heads and the Deep Ensemble's members at the heads'
1/4 resolution, brought to full size one at a time; MC Dropout runs its T passes as one batch
of T x B images, so its T samples sit at full resolution together; the two cheap baselines
compute one sample at a time on either device. Either way the Summary adds
them up one by one and keeps only its running sums (bench.py's peak column measures memory).

The same Prediction of a Deep Ensemble is the teacher's target for EMUFormer (log q for Eq. 8,
sigma^2 for Eq. 9).

    teacher = DeepEnsemble(members)                 # stacks the weights once on a GPU
    pred = predict(teacher, images, 'de')
    pred = predict(model, images, 'mcd', samples=10, dropout=0.2)
    pred.probs, pred.pred, pred.entropy, pred.depth_mean, pred.depth_var

The metrics that judge a Prediction are in metrics.py, the loop over a data set in evaluate.py.
"""

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from heads import DeepSubEnsemble, full_size, run_heads
from mit import DropPath
from plumbing import positive_int, rate

# ---- Uncertainty methods ----

METHODS = ('none', 'mcd', 'dse', 'de', 'mcd-decoder', 'drop-path')
# the methods that draw T random samples of one network, and the options of predict() each uses
# (evaluate.py and predict.py pass only these, and record them with the seed)
METHOD_OPTIONS = {'mcd': ('samples', 'dropout'), 'mcd-decoder': ('samples', 'dropout'), 'drop-path': ('samples',)}


def add_method_options(parser):
    """The options that choose and shape an uncertainty method, spelled alike in evaluate.py and
    predict.py (each passes predict() only its method's, METHOD_OPTIONS)."""
    a = parser.add_argument
    a('--method', choices=METHODS, help="uncertainty method (uq.py); default: 'de' for several checkpoints, "
                                        "'dse' for a Deep Sub-Ensemble, else 'none'")
    a('--samples', type=positive_int, default=10, help='samples of mcd, mcd-decoder and drop-path (their passes), >= 1')
    a('--dropout', type=rate, default=0.2, help='mcd and mcd-decoder: dropout rate at test time, in [0, 1) '
                                                '(the paper: 0.2, 0.5)')
    a('--seed', type=int, default=0, help="seed of the sampling methods' masks (mcd, mcd-decoder, drop-path; "
                                          "evaluate.py adds the rank)")


@contextmanager
def mc_dropout(model, p):
    """Monte Carlo Dropout (Gal & Ghahramani): inside this block every dropout layer of `model`
    samples a fresh mask at rate p, even in eval mode; BatchNorm keeps its running statistics
    and stochastic depth stays off, so the only randomness is dropout's. Rates and modes are
    restored on exit.

        model.eval()
        with mc_dropout(model, 0.2):
            samples = [model(x) for _ in range(10)]
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    saved = [(m.p, m.training) for m in layers]
    for m in layers:
        m.p = p
        m.train()
    try:
        yield model
    finally:
        for m, (rate, training) in zip(layers, saved):
            m.p = rate
            m.train(training)


@dataclass
class Prediction:
    """Mean prediction and predictive uncertainty of a batch; None for a task the model lacks
    (and for the decomposition unless it was asked for).

    probs               (B, K, H, W)  the mean softmax q
    entropy             (B, H, W)     H(q), nats (Eq. 3): the total uncertainty
    depth_mean          (B, H, W)     mean depth, metres
    depth_var           (B, H, W)     predictive variance, metres^2 (Eq. 10)
    decompose=True adds Section 2.2's two kinds of uncertainty:
    aleatoric_entropy   (B, H, W)     the mean of the samples' entropies (data uncertainty)
    mutual_information  (B, H, W)     entropy - aleatoric_entropy (model uncertainty)
    aleatoric_var       (B, H, W)     Eq. 10's first term, the mean of the variances
    epistemic_var       (B, H, W)     its second, the spread of the means
    """
    probs: torch.Tensor = None
    entropy: torch.Tensor = None
    depth_mean: torch.Tensor = None
    depth_var: torch.Tensor = None
    aleatoric_entropy: torch.Tensor = None
    mutual_information: torch.Tensor = None
    aleatoric_var: torch.Tensor = None
    epistemic_var: torch.Tensor = None

    @property
    def log_probs(self):
        return self.probs.log()  # log q for Eq. 8; -inf where q = 0, which losses.kl_divergence handles

    @property
    def pred(self):
        return self.probs.max(dim=1).indices  # (B, K, H, W) -> (B, H, W) class ids, ties to the lowest


# True: the softmax of channels_last logits on a CPU takes the speed-up at the end of this file;
# bench.py's rows segdepthformer-plain-softmax and segdepthformer-plain (with
# heads.FAST_UPSAMPLE) set it False, to time the plain form
FAST_SOFTMAX = True


def softmax(z):
    """Softmax over the classes of (B, K, H, W) logits, in float32."""
    z = z.float()
    if FAST_SOFTMAX and z.device.type == 'cpu' and z.is_contiguous(memory_format=torch.channels_last):
        return softmax_channels_last(z)
    return F.softmax(z, dim=1)


def entropy(p):
    """-sum_c p_c log p_c over dim 1 of (B, K, H, W) probabilities, with 0 log 0 = 0 (the
    clamp turns log 0 = -inf into a finite number that 0 multiplies to 0). The sum over classes
    is one batched dot product per pixel."""
    log_p = p.log().clamp_min_(torch.finfo(p.dtype).min)
    return -torch.einsum('bkhw,bkhw->bhw', p, log_p)


class Summary:
    """Eq. 3 and Eq. 10 accumulated over samples, one at a time, in running sums that take the
    memory of one sample whatever S is: the sum of the softmaxes (and of their
    entropies, with decompose), and for depth the running mean and summed squared deviations of
    the means (Welford's update, exact where E[mu^2] - E[mu]^2 would cancel) and the sum of the
    variances. add(out) takes one sample's output dict at the input size, (B, ...)."""

    def __init__(self, decompose=False):
        self.decompose, self.n = decompose, 0
        self.probs = self.entropies = self.mean = self.squares = self.variances = None

    def add(self, out):
        self.n += 1
        if 'seg_logits' in out:
            p = softmax(out['seg_logits'])
            self.probs = p if self.probs is None else self.probs.add_(p)
            if self.decompose:
                h = entropy(p)
                self.entropies = h if self.entropies is None else self.entropies.add_(h)
        if 'depth_mean' in out:
            mu, var = out['depth_mean'].float(), out['depth_var'].float()
            if self.mean is None:
                self.mean, self.squares, self.variances = mu.clone(), torch.zeros_like(mu), var.clone()
            else:
                delta = mu - self.mean
                self.mean.add_(delta / self.n)
                self.squares.addcmul_(delta, mu - self.mean)
                self.variances.add_(var)

    def prediction(self):
        pred = Prediction()
        if self.probs is not None:
            pred.probs = self.probs.div_(self.n)
            # Eq. 3; of one sample it is that sample's entropy, already summed when decomposing
            pred.entropy = self.entropies if self.decompose and self.n == 1 else entropy(pred.probs)
            if self.decompose:
                pred.aleatoric_entropy = self.entropies / self.n
                pred.mutual_information = pred.entropy - pred.aleatoric_entropy
        if self.mean is not None:
            pred.depth_mean = self.mean
            aleatoric, epistemic = self.variances / self.n, self.squares / self.n  # 1/S, not 1/(S-1)
            pred.depth_var = aleatoric + epistemic  # Eq. 10
            if self.decompose:
                pred.aleatoric_var, pred.epistemic_var = aleatoric, epistemic
        return pred


def summarize(samples, decompose=False):
    """Samples (the model's output dict with a leading sample dimension S) -> Prediction."""
    summary = Summary(decompose)
    for t in range(next(iter(samples.values())).shape[0]):
        summary.add({k: v[t] for k, v in samples.items()})
    return summary.prediction()


class DeepEnsemble:
    """N trained members of one architecture, run as one model.

    batched=True stacks the members' weights once, (N, ...) per tensor, and runs the network
    once with torch.func.vmap over that stack: every layer processes all members in one call
    (a conv becomes a grouped conv, a matmul a batched matmul), which keeps a GPU busy where a
    loop of N small passes would not. A CPU has no idle units to fill, and there the loop is
    faster. bench.py times both (rows de-batched and de-looped; docs/results.md has the
    measurements this default rests on): batched=None, the default, batches on a GPU and loops
    on a CPU. outputs(images) yields the members' output dicts one at a time (the batched pass
    stops at the heads' 1/4-resolution outputs, which are small, and brings one member at a
    time to full size); self(images) stacks them, (N, B, ...). Members are used in eval mode
    and without gradients (the ensemble is a fixed teacher or evaluator).
    """

    def __init__(self, members, batched=None):
        self.members = [m.eval() for m in members]
        self.batched = all_at_once(next(members[0].parameters()).device) if batched is None else batched
        if self.batched:
            params, self.buffers = stack_module_state(self.members)
            self.params = {k: v.detach() for k, v in params.items()}
            # a weightless copy of the architecture; functional_call supplies the stacked tensors
            self.base = copy.deepcopy(self.members[0]).to('meta')

    def __len__(self):
        return len(self.members)

    @torch.no_grad()
    def outputs(self, images):
        if not self.batched:
            for m in self.members:
                yield m(images)
            return
        member = lambda params, buffers, x: functional_call(self.base, (params, buffers), (x,), {'full': False})
        with warnings.catch_warnings():
            # PyTorch has no vmap rule for the CPU flash-attention kernel, nor for the in-place
            # baddbmm_ of heads.upsample_by_matrices, and loops over the members for those ops;
            # the result is the same, so the warning is only noise
            warnings.filterwarnings('ignore', message='There is a performance drop')
            low = vmap(member, in_dims=(0, 0, None))(self.params, self.buffers, images)  # {task: (N, B, ...)}
        for n in range(len(self)):
            yield full_size({task: z[n] for task, z in low.items()}, images.shape[-2:])

    def __call__(self, images):
        outs = list(self.outputs(images))
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


def all_at_once(device):
    """Whether the samples of a prediction (MC Dropout passes, DSE heads, Deep Ensemble members)
    run all at once on `device`: on a GPU, which wants large batches, yes; on a CPU, which runs
    no faster in larger batches and would hold them all in memory, one at a time."""
    return torch.device(device).type == 'cuda'


def default_chunk(images, total):
    """How many samples one call computes (all_at_once)."""
    return total if all_at_once(images.device) else 1


def mc_dropout_outputs(model, images, samples=10, dropout=0.2, chunk=None):
    """T = `samples` passes with every dropout layer on at rate `dropout`, yielded one output
    dict (B, ...) at a time; `chunk` passes run as one batch of chunk * B images, each replica
    with its own masks."""
    chunk = chunk or default_chunk(images, samples)
    B = images.shape[0]
    with mc_dropout(model, dropout):
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            out = model(images.repeat(n, 1, 1, 1))  # (n*B, ...): replica t of image b at t*B + b
            for t in range(n):
                yield {k: v[t * B:(t + 1) * B] for k, v in out.items()}


def dse_outputs(model, images, chunk=None):
    """A Deep Sub-Ensemble's heads on one pass of its encoder, `chunk` members' decoders as one
    grouped computation, yielded one member's output dict (B, ...) at a time."""
    chunk = chunk or default_chunk(images, model.num_members)
    features = model.backbone(images)
    for start in range(0, model.num_members, chunk):
        for low in model.run_members(features, range(start, min(start + chunk, model.num_members))):
            yield full_size(low, images.shape[-2:])


def decoder_mc_dropout_outputs(model, images, samples=10, dropout=0.2):
    """Decoder MC Dropout (method 'mcd-decoder'): the encoder once, without dropout, then
    `samples` passes of the decoders with their Dropout2d on at rate `dropout`, yielded one
    output dict (B, ...) at a time. Only the decoders' dropout layers are switched on."""
    features = model.backbone(images)
    heads = [(t, model.decode_head if t == 'seg' else model.depth_head) for t in model.tasks]
    with mc_dropout(nn.ModuleList(d for _, d in heads), dropout):
        for _ in range(samples):
            yield full_size(dict(run_heads(heads, features)), images.shape[-2:])


@contextmanager
def drop_path_on(model):
    """Inside this block every DropPath of `model` (MiT's stochastic depth) drops its residual
    branch for whole images at random, at its own rate, even in eval mode; dropout and BatchNorm
    stay as they are. Modes are restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, DropPath)]
    saved = [m.training for m in layers]
    for m in layers:
        m.train()
    try:
        yield model
    finally:
        for m, training in zip(layers, saved):
            m.train(training)


def drop_path_outputs(model, images, samples=10):
    """Test-time drop-path (method 'drop-path'): `samples` whole passes with DropPath on, yielded
    one output dict (B, ...) at a time."""
    with drop_path_on(model):
        for _ in range(samples):
            yield model(images)


def mc_dropout_samples(model, images, samples=10, dropout=0.2, chunk=None):
    """The MC Dropout samples stacked: (T, B, ...) per output (for tests and inspection)."""
    with torch.no_grad():
        outs = list(mc_dropout_outputs(model, images, samples, dropout, chunk))
    return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


@torch.no_grad()
def predict(model, images, method='none', samples=10, dropout=0.2, chunk=None, decompose=False):
    """The single entry point: a model and an image batch (B, 3, H, W) -> Prediction.

    method  'none'  model is a SegFormer/DepthFormer/SegDepthFormer; one pass
            'mcd'   the same kind of model; `samples` passes at dropout rate `dropout`
            'mcd-decoder', 'drop-path'
                    the same kind of model; the cheap baselines (module docstring), `samples`
                    samples each, mcd-decoder's at dropout rate `dropout`
            'dse'   model is a heads.DeepSubEnsemble; all heads
            'de'    model is a DeepEnsemble (or a list of members, stacked on every call)
    chunk: MC Dropout passes or DSE members computed per call (default_chunk). decompose:
    also the aleatoric and epistemic parts (Prediction). The samples are summarised as they come
    (Summary); how many are in memory at once is said in the module docstring. The model is put in eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"unknown uncertainty method {method!r}: expected one of {', '.join(METHODS)}")
    if method != 'de' and (method == 'dse') != isinstance(model, DeepSubEnsemble):
        raise ValueError(f"method {method!r} does not fit a {type(model).__name__}: "
                         "a DeepSubEnsemble is evaluated with method 'dse' and only it")
    if method == 'de':
        outputs = (model if isinstance(model, DeepEnsemble) else DeepEnsemble(model)).outputs(images)
    elif method == 'mcd':
        outputs = mc_dropout_outputs(model.eval(), images, samples, dropout, chunk)
    elif method == 'mcd-decoder':
        outputs = decoder_mc_dropout_outputs(model.eval(), images, samples, dropout)
    elif method == 'drop-path':
        outputs = drop_path_outputs(model.eval(), images, samples)
    elif method == 'dse':
        outputs = dse_outputs(model.eval(), images, chunk)
    else:
        outputs = [model.eval()(images)]
    summary = Summary(decompose)
    for out in outputs:
        summary.add(out)
    return summary.prediction()


# ---------------------------------------------------------------------------------------------
# --- speed-up: the softmax of channels_last logits (replaces F.softmax(z, dim=1) in softmax
# above on a CPU; bench.py rows segdepthformer and segdepthformer-plain-softmax, timed in the
# same run; docs/results.md)

def softmax_channels_last(z):
    """softmax() for channels_last logits, which the models return (their heads' 1/4-resolution
    outputs are channels_last, and F.interpolate keeps the layout): over the last dimension of
    the (B, H, W, K) view, where the classes of a pixel lie next to each other in memory, and
    the result keeps that layout. torch's CPU softmax over dim 1 of such a tensor returns the
    default layout, converting it on the way."""
    return F.softmax(z.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
