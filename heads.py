"""
The all-MLP decoders of SegFormer and the four models of the paper built on them.

The decoder (SegFormer's "all-MLP" head; paper Figures 1-3) turns the encoder's four maps f_i
(C_i channels at 1/4, 1/8, 1/16, 1/32 resolution) into one prediction at 1/4 resolution:

    e_i = L_i f_i + b_i            a linear layer per stage to a common width E (256 or 768)
    u_i = up(e_i)                  bilinear upsampling to 1/4 resolution
    z   = W [u_4; u_3; u_2; u_1]   concatenate (4E channels) and fuse with a 1x1 conv to E
    out = P dropout(ReLU(BN(z)))   BatchNorm, ReLU, dropout 0.1, a 1x1 prediction layer

`AllMLPDecoder.forward` is exactly this, SegFormer's head. The parameters and their names are
those of the official SegFormerHead (`linear_c1..4.proj`, `linear_fuse.conv`, `linear_fuse.bn`,
`linear_pred`), so official checkpoints load.

The exact fold (the second section of this file). Everything that happens before the
BatchNorm is linear: the per-stage layers, the bilinear upsampling (a fixed weighted average of
neighbours whose weights sum to one) and the fuse conv. Splitting W into its four column blocks
W_i (one per stage),

    z = sum_i W_i up(L_i f_i + b_i) = sum_i up((W_i L_i) f_i + W_i b_i)

because a 1x1 conv commutes with upsampling, and up() maps a constant to the same constant. So
each stage can be taken straight to the fused width E at its own low resolution with the
(E x C_i) matrix W_i L_i, and the (E x 4E) fuse conv on 4E channels at 1/4 resolution, most of
the decoder's multiply-adds, disappears (bench.py counts both forms; docs/results.md has the
figures). BatchNorm, ReLU, dropout and the prediction layer come after the sum and are
unchanged, except that in eval mode BatchNorm is a fixed per-channel affine map, which folds
into the W_i L_i too. The models compute this form (`fused_features`), in training and
inference; gradients flow to the original parameters through W_i L_i. Several decoders reading
the same features (the two heads of SegDepthFormer, the 2N heads of a Deep Sub-Ensemble) run as
one grouped computation: their matrices W_i L_i are stacked, so each stage costs one 1x1 conv
for all heads (stages 1 and 2 share one; folded_sum says why). `folded_sum` is the one
implementation of the sum: the models run it through `fused_features`, and predict.py's export
(FoldedNetwork) and bench.py run it too. The tests check the fold against
`AllMLPDecoder.forward`.

Heads and outputs (`head_outputs`):
    segmentation  K logits; the softmax (Eq. 1) is taken later, after upsampling
    depth         2 channels: mean mu = ReLU(z_0) (Eq. 4), variance s^2 = Softplus(z_1) (Eq. 5)
Every model returns the same dict, upsampled bilinearly to the input size:
    'seg_logits' (B, K, H, W)   raw logits             (models with a segmentation head)
    'depth_mean' (B, H, W)      metres, >= 0           (models with a depth head)
    'depth_var'  (B, H, W)      metres^2, > 0
A Deep Sub-Ensemble run with all heads returns the same keys with a leading head dimension N.

Models: SegFormer (segmentation), DepthFormer (depth), SegDepthFormer (both, shared encoder;
the EMUFormer student has this architecture) and DeepSubEnsemble (one encoder, N heads per task).
`build_model` makes any of them by name. Checkpoints are read here, in one place: `load_model`
rebuilds one from a checkpoint of train.py or distill.py, `load_members` the members of a Deep
Ensemble, `describe` names what was loaded (reading and strict loading: plumbing.py).
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from mit import MixVisionTransformer, get_config, load_encoder
from plumbing import load_file, load_strict, read_state_dict


# ---------------------------------------------------------------------------------------------
# SegFormer's all-MLP head

class StageLinear(nn.Module):
    """L_i: the linear layer that takes stage i's C_i channels to the decoder's width E."""

    def __init__(self, in_dim, embed_dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)  # named as in the official head

    def forward(self, f):
        x = self.proj(f.flatten(2).transpose(1, 2))  # (B, C_i, h, w) -> (B, h*w, E)
        return x.transpose(1, 2).unflatten(2, f.shape[-2:])  # (B, h*w, E) -> (B, E, h, w)


class ConvModule(nn.Module):
    """1x1 conv without bias + BatchNorm, named as mmcv's ConvModule (ReLU is applied in the
    decoder)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)


class AllMLPDecoder(nn.Module):
    def __init__(self, in_dims, embed_dim, out_dim, dropout=0.1):
        super().__init__()
        self.embed_dim = embed_dim
        for i, dim in enumerate(in_dims):
            setattr(self, f'linear_c{i + 1}', StageLinear(dim, embed_dim))
        self.linear_fuse = ConvModule(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, out_dim, 1)
        # He (fan-out) for the fuse conv, as mmcv's ConvModule. The prediction layer starts
        # small, N(0, 0.01): mmseg's base class gives that to its conv_seg, the layer it predicts
        # with; SegFormer predicts with linear_pred instead and leaves it at PyTorch's default.
        nn.init.kaiming_normal_(self.linear_fuse.conv.weight, mode='fan_out', nonlinearity='relu')
        nn.init.normal_(self.linear_pred.weight, std=0.01)
        nn.init.zeros_(self.linear_pred.bias)

    def forward(self, features):
        """The encoder's four maps [(B, C_i, h_i, w_i)] -> (B, out_dim, h_1, w_1), as SegFormer
        writes it (the models run the fold below, which equals this)."""
        size = features[0].shape[-2:]
        e = [getattr(self, f'linear_c{i + 1}')(f) for i, f in enumerate(features)]  # (B, E, h_i, w_i)
        u = [e[0]] + [F.interpolate(x, size, mode='bilinear', align_corners=False) for x in e[1:]]  # at 1/4
        z = self.linear_fuse.conv(torch.cat(u[::-1], dim=1))  # concatenated c4, c3, c2, c1: (B, 4E, h, w) -> (B, E, h, w)
        return self.output_layer(F.relu(self.linear_fuse.bn(z)))

    def output_layer(self, x):
        """(B, E, h, w) = ReLU(BN(fused features)) -> (B, out_dim, h, w): Dropout2d (whole
        channels, in training and under MC Dropout), then the 1x1 prediction layer. On a CPU and
        without gradients (MC Dropout) a dropout that is on takes the speed-up at the end of this
        file, dropped_pointwise, which reads the Dropout2d layer's rate and mode but does not
        call it (its forward hooks do not run)."""
        drop = self.dropout
        on = drop.training and 0 < drop.p < 1
        if FAST_DROPOUT2D and on and x.device.type == 'cpu' and not torch.is_grad_enabled():
            return dropped_pointwise(x, self.linear_pred, drop.p)
        return pointwise(drop(x), self.linear_pred.weight, self.linear_pred.bias)


def pointwise(x, weight, bias=None):
    """A 1x1 conv (B, C, h, w) -> (B, C', h, w) with `weight` (C', C) or (C', C, 1, 1), written
    as the matmul over the channels that it is: (B, h, w, C) @ (C, C'). A matmul reads a head's
    channel slice of fused_features' grouped map where it lies (F.conv2d would copy it out
    first), and its output is channels_last, as upsample's faster form wants it. An ONNX export
    gets it as a MatMul, which onnxruntime runs on the (B, h, w, C) layout as it comes, whereas it
    reorders a Conv's input into its blocked layout and the output back (docs/results.md)."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# The exact fold, for one decoder or several at once (module docstring)

def fold(decoder, i):
    """Stage i's fold (0-based) -> (M, c): the (E, C_i) matrix W_i L_i and the bias W_i b_i that
    take the stage's features straight to the fused width. In eval mode BatchNorm is a fixed
    per-channel affine map s * z + t, which commutes with the sum too: s scales every stage's
    rows, t joins stage 1's bias, and no BatchNorm runs at all."""
    E = decoder.embed_dim
    linear = getattr(decoder, f'linear_c{i + 1}').proj
    W = decoder.linear_fuse.conv.weight.flatten(1)  # (E, 4E, 1, 1) -> (E, 4E)
    W_i = W[:, (3 - i) * E:(4 - i) * E]  # the concatenation order is c4, c3, c2, c1
    M, c = W_i @ linear.weight, W_i @ linear.bias
    if decoder.training:  # BatchNorm normalises with the batch's statistics: it runs after the sum
        return M, c
    bn = decoder.linear_fuse.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias - bn.running_mean * s if i == 0 else 0
    return s[:, None] * M, s * c + t


def stacked_folds(decoders, stages=4):
    """The folds of G decoders stacked: per stage i the matrix (G*E, C_i) of every decoder's
    W_i L_i, and one bias (G*E,), the sum of the stages' (each decoder's BatchNorm shift once)."""
    folds = [[fold(d, i) for d in decoders] for i in range(stages)]  # per stage, per decoder
    weights = [torch.cat([m for m, _ in stage]) for stage in folds]
    return weights, sum(torch.cat([c for _, c in stage]) for stage in folds)


# True: the speed-ups at the end of this file run. FAST_UPSAMPLE: upsampling added into a map
# on a CPU; FAST_DROPOUT2D: a decoder's Dropout2d that is on, on a CPU without gradients;
# FAST_FOLDS: the folds kept between calls without gradients, on any device. bench.py's rows
# segdepthformer-plain-upsample, mcd-decoder-plain and segdepthformer-plain-folds set each False
# to time the plain form (segdepthformer-plain the first and the third, with uq's speed-up;
# mcd-plain the second, with mit's)
FAST_UPSAMPLE = True
FAST_DROPOUT2D = True
FAST_FOLDS = True


def upsample(x, size, out=None):
    """Bilinear upsampling of x (B, C, h, w) to size (H, W), as F.interpolate(align_corners=
    False) computes it, or added into `out` (B, C, H, W) in place. Added on a CPU into a
    channels_last map (as folded_sum's), it takes the faster form at the end of this file
    (upsample_by_matrices), which writes nothing as large as `out` on the way; an ONNX export
    always gets F.interpolate (in onnxruntime the matrices were no faster: docs/results.md)."""
    into_rows = out is not None and out.permute(0, 2, 3, 1).is_contiguous()  # channels_last: (B, H, W*C) rows
    if FAST_UPSAMPLE and into_rows and x.device.type == 'cpu' and not torch.onnx.is_in_onnx_export():
        return upsample_by_matrices(x, size, out)
    up = F.interpolate(x, size, mode='bilinear', align_corners=False)
    return up if out is None else out.add_(up)


def folded_sum(features, weights, bias):
    """z = sum_i up(M_i f_i) + c: the encoder's four maps [(B, C_i, h_i, w_i)], the stacked
    matrices [(G*E, C_i)] and bias (G*E,) of stacked_folds -> (B, G*E, h_1, w_1), channels_last.

    Stages 3 and 4 go to the fused width at their own resolution (a 1x1 conv, `pointwise`) and
    are then upsampled to 1/4 resolution, added in place into z. Stage 2 goes the other way
    round, as up(M_2 f_2) = M_2 up(f_2) allows: its C_2 channels are far fewer than the G*E it
    would be upsampled with otherwise, so upsampled first it joins stage 1 in one 1x1 conv over
    C_1 + C_2 channels, which takes less time and memory for a few more multiply-adds (bench.py
    counts them). The bias goes in once, with stage 4's small map (upsampling keeps a constant)."""
    size = features[0].shape[-2:]
    z = pointwise(torch.cat([features[0], upsample(features[1], size)], dim=1), torch.cat(weights[:2], dim=1))
    upsample(pointwise(features[2], weights[2]), size, out=z)  # added in place: z is the large tensor
    upsample(pointwise(features[3], weights[3], bias), size, out=z)
    return z


def fused_features(decoders, features):
    """ReLU(BN(z)) of every decoder, through the fold: the encoder's four maps
    [(B, C_i, h_i, w_i)] -> one (B, E, h_1, w_1) map per decoder, equal to what
    AllMLPDecoder.forward computes before its output layer. The G decoders' matrices are
    stacked, so each stage costs one 1x1 conv for all of them."""
    if FAST_FOLDS and not torch.is_grad_enabled():  # no gradient to carry: the speed-up may keep them
        folds = kept_folds(decoders, len(features))
    else:
        folds = stacked_folds(decoders, len(features))
    z = folded_sum(features, *folds)  # (B, G*E, h_1, w_1)
    if not decoders[0].training:  # BatchNorm is folded into the matrices: ReLU is all that is left
        return F.relu(z, inplace=True).chunk(len(decoders), dim=1)
    return [F.relu(d.linear_fuse.bn(z_d)) for d, z_d in zip(decoders, z.chunk(len(decoders), dim=1))]


# ---------------------------------------------------------------------------------------------
# Models

def head_outputs(task, z, size):
    """A head's 1/4-resolution output -> the model's output dict at the input size: Eq. 4 and 5
    for depth. Upsampling comes before the activations, as the paper does for the softmax
    (Section 3.2.1)."""
    if task == 'seg':
        return {'seg_logits': upsample(z, size)}
    # depth in float32 whatever autocast does (no autocast list lowers these ops): in half
    # precision Softplus underflows to 0 below about -17, where the loss's 1/s^2 then overflows
    z = upsample(z.float(), size)
    return {'depth_mean': F.relu(z[:, 0]),        # Eq. 4
            'depth_var': F.softplus(z[:, 1])}     # Eq. 5


def run_heads(heads, features, textbook=False):
    """[(task, decoder)] on the encoder's features -> [(task, z)], each head's output at 1/4
    resolution: through the fold, or with textbook=True through AllMLPDecoder.forward (the
    reference)."""
    tasks, decoders = zip(*heads)
    if textbook:
        z = [d(features) for d in decoders]
    else:
        z = [d.output_layer(fused) for d, fused in zip(decoders, fused_features(decoders, features))]
    return list(zip(tasks, z))


def full_size(low, size):
    """{task: z at 1/4 resolution} -> the model's output dict at `size` (head_outputs)."""
    out = {}
    for task, z in low.items():
        out.update(head_outputs(task, z, size))
    return out


class SegDepthFormer(nn.Module):
    """A MiT encoder and one all-MLP decoder per task: segmentation ('decode_head', named as in
    official SegFormer checkpoints) and depth ('depth_head'). SegFormer and DepthFormer below are
    the one-task cases. forward(x, textbook=True) runs the unfolded decoders (the reference);
    forward(x, full=False) stops at the heads' 1/4-resolution outputs {task: z} (uq.py
    summarises many samples from those, bringing one at a time to full size)."""
    tasks = ('seg', 'depth')

    def __init__(self, backbone='b2', num_classes=40, drop_path_rate=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = MixVisionTransformer(backbone, drop_path_rate)
        cfg = get_config(backbone)
        if 'seg' in self.tasks:
            self.decode_head = AllMLPDecoder(cfg.embed_dims, cfg.decoder_dim, num_classes)
        if 'depth' in self.tasks:
            self.depth_head = AllMLPDecoder(cfg.embed_dims, cfg.decoder_dim, 2)

    def forward(self, x, textbook=False, full=True):
        heads = [(t, self.decode_head if t == 'seg' else self.depth_head) for t in self.tasks]
        low = dict(run_heads(heads, self.backbone(x), textbook))
        return full_size(low, x.shape[-2:]) if full else low


class SegFormer(SegDepthFormer):
    tasks = ('seg',)


class DepthFormer(SegDepthFormer):
    tasks = ('depth',)


class DeepSubEnsemble(nn.Module):
    """Deep Sub-Ensemble (Valdenegro-Toro; paper Section 4): one shared encoder and N decoders
    per task. Training optimises one head per batch, alternating, so the heads see different
    batches and stay diverse: forward(x, head=k) returns that head's output dict. Inference uses
    all heads: forward(x) runs the encoder once and the N (or 2N) decoders as one grouped
    computation, and returns every output with a leading head dimension N; uq.py runs the
    encoder once and run_members on groups of members, so as not to hold N outputs at once."""

    def __init__(self, backbone='b2', num_classes=40, tasks=('seg', 'depth'), num_members=10,
                 drop_path_rate=0.1):
        super().__init__()
        self.num_classes, self.tasks, self.num_members = num_classes, tuple(tasks), num_members
        self.backbone = MixVisionTransformer(backbone, drop_path_rate)
        cfg = get_config(backbone)
        if 'seg' in self.tasks:
            self.decode_heads = nn.ModuleList(
                AllMLPDecoder(cfg.embed_dims, cfg.decoder_dim, num_classes) for _ in range(num_members))
        if 'depth' in self.tasks:
            self.depth_heads = nn.ModuleList(
                AllMLPDecoder(cfg.embed_dims, cfg.decoder_dim, 2) for _ in range(num_members))

    def run_members(self, features, members):
        """The 1/4-resolution outputs {task: z} of each of `members` (head indices) on the
        encoder's features, all their decoders as one grouped computation."""
        heads = [(t, (self.decode_heads if t == 'seg' else self.depth_heads)[k])
                 for k in members for t in self.tasks]
        low, T = run_heads(heads, features), len(self.tasks)
        return [dict(low[i * T:(i + 1) * T]) for i in range(len(members))]

    def forward(self, x, head=None):
        members = range(self.num_members) if head is None else [head]
        outs = [full_size(o, x.shape[-2:]) for o in self.run_members(self.backbone(x), members)]
        if head is not None:
            return outs[0]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}  # (N, B, ...)


SINGLE_MODELS = {'segformer': SegFormer, 'depthformer': DepthFormer, 'segdepthformer': SegDepthFormer}
DSE_TASKS = {'dse': ('seg', 'depth'), 'dse-segformer': ('seg',), 'dse-depthformer': ('depth',)}
MODEL_NAMES = [*SINGLE_MODELS, *DSE_TASKS]


def build_model(name, backbone='b2', num_classes=40, **kwargs):
    """The one constructor every script uses. name: segformer, depthformer, segdepthformer, or
    a Deep Sub-Ensemble of them (dse = of SegDepthFormer, dse-segformer, dse-depthformer);
    backbone: b0..b5; kwargs: drop_path_rate, and num_members for a DSE. The arguments are kept
    as model.config so that a checkpoint can rebuild the model."""
    get_config(backbone)  # fail early, with the list of backbones
    if name in SINGLE_MODELS:
        model = SINGLE_MODELS[name](backbone, num_classes, **kwargs)
    elif name in DSE_TASKS:
        model = DeepSubEnsemble(backbone, num_classes, DSE_TASKS[name], **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    model.config = dict(name=name, backbone=backbone, num_classes=num_classes, **kwargs)
    return model


def load_segformer_checkpoint(model, path):
    """Start a model from pretrained weights (train.py's --pretrained): ImageNet weights for the
    encoder (mit.load_pretrained's files), or a whole segmentation SegFormer: an official
    (mmsegmentation) checkpoint, keys under 'backbone.' and 'decode_head.', or Hugging Face's
    SegformerForSemanticSegmentation (a downloaded nvidia/segformer-b*-finetuned-* folder, or its
    weights file). The encoder loads by mit.load_pretrained's rules. A SegFormer's head loads
    exactly into a model with a segmentation head and as many classes, else it is left as it is
    (and a line says so); a SegDepthFormer's depth head is in no such file and stays as it is."""
    state = read_state_dict(path)
    load_encoder(model.backbone, state, path)
    head = decode_head_state(state)
    if not head:
        return
    num_classes = head['linear_pred.weight'].shape[0] if 'linear_pred.weight' in head else None
    if not hasattr(model, 'decode_head') or num_classes != model.num_classes:
        print(f'{path}: its head predicts {num_classes} classes, the model '
              + (f'{model.num_classes}' if hasattr(model, 'decode_head') else 'has no single segmentation head')
              + '; the encoder is loaded, the segmentation head starts untrained')
        return
    load_strict(model.decode_head, head, path)


# Hugging Face's decode head -> SegFormer's official one (mit.py renames their encoder)
HF_HEAD_NAMES = {'linear_fuse': 'linear_fuse.conv', 'batch_norm': 'linear_fuse.bn', 'classifier': 'linear_pred'}


def decode_head_state(state):
    """The segmentation head's tensors of a whole SegFormer, in the official names without the
    'decode_head.' prefix: Hugging Face's linear_c.{i} become linear_c{i + 1} (and the names
    above); mmseg's unused 'conv_seg' (its base class makes one; SegFormer predicts with
    linear_pred) is dropped."""
    head = {}
    for name, value in state.items():
        if not name.startswith('decode_head.') or name.startswith('decode_head.conv_seg.'):
            continue
        module, kind = name[len('decode_head.'):].rsplit('.', 1)
        if module.startswith('linear_c.'):  # linear_c.0.proj
            index, rest = module[len('linear_c.'):].split('.', 1)
            module = f'linear_c{int(index) + 1}.{rest}'
        head[f'{HF_HEAD_NAMES.get(module, module)}.{kind}'] = value
    return head


def load_model(path):
    """Rebuild a model from a checkpoint written by train.py or distill.py: a dict with the
    model's weights under 'model', build_model's arguments under 'config', and what else it
    knows under 'meta' (data.checkpoint_meta: the classes and their palette, the objective), which
    the model keeps as model.meta."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or 'config' not in ckpt:
        raise ValueError(f"{path}: no 'config' entry; expected a checkpoint written by train.py or distill.py")
    model = build_model(**ckpt['config'])
    load_strict(model, ckpt['model'], path)
    model.meta = ckpt.get('meta', {})
    return model


def describe(model):
    """E.g. 'segdepthformer-b0 with 6 classes', to name an architecture in a message."""
    cfg = model.config
    return f"{cfg['name']}-{cfg['backbone']} with {cfg['num_classes']} classes"


def load_members(paths):
    """One model per checkpoint (on the CPU). Several are a Deep Ensemble, whose members must be
    single models of one architecture: vmap stacks their weights tensor by tensor."""
    models = [load_model(p) for p in paths]  # a missing or foreign file raises, naming it
    if len(models) > 1:
        for path, model in zip(paths, models):
            if isinstance(model, DeepSubEnsemble):
                raise ValueError(f'{path} is a Deep Sub-Ensemble; the members of a Deep Ensemble '
                                 'must be single models (evaluate a DSE on its own)')
            if describe(model) != describe(models[0]):
                raise ValueError(f'the members of a Deep Ensemble must share one architecture: '
                                 f'{paths[0]} is {describe(models[0])}, {path} is {describe(model)}')
    return models


# ---------------------------------------------------------------------------------------------
# --- speed-up: bilinear upsampling as two matrix products (replaces F.interpolate in upsample
# above on a CPU; bench.py rows segdepthformer and segdepthformer-plain-upsample, timed in the
# same run; docs/results.md)

def interpolation_matrix(n, N, dtype):
    """(N, n): row o holds the weights with which F.interpolate(mode='bilinear',
    align_corners=False) mixes the n inputs along one axis into output o. Output o reads the
    source coordinate (o + 0.5) n / N - 0.5, clamped to [0, n - 1], and input i gets the tent
    weight max(0, 1 - |coordinate - i|): at most two neighbours, summing to one."""
    source = ((torch.arange(N, dtype=torch.float64) + 0.5) * (n / N) - 0.5).clamp(0, n - 1)
    return (1 - (source[:, None] - torch.arange(n, dtype=torch.float64)).abs()).clamp_min(0).to(dtype)


def upsample_by_matrices(x, size, out):
    """upsample(x, size, out) for a channels_last `out`: up(x) = U_H x U_W^T per channel, two
    matrix products over the (B, h, w, C) view in which channels_last maps lie contiguous: along
    the width one batched product with U_W (W, w), then along the height one product with U_H
    (H, h) of rows of W * C numbers each, which adds into `out` in place (baddbmm): one pass over
    the large map, where F.interpolate writes a map as large and the add reads it back. The
    numbers are F.interpolate's up to rounding (tests/test_models.py)."""
    (h, w), (H, W) = x.shape[-2:], size
    B, C = x.shape[:2]
    rows = torch.matmul(interpolation_matrix(w, W, x.dtype), x.permute(0, 2, 3, 1))  # (W, w) @ (B, h, w, C)
    U = interpolation_matrix(h, H, x.dtype).expand(B, H, h)  # (H, h), one per image
    target = out.permute(0, 2, 3, 1).view(B, H, W * C)  # out's memory: (B, H, W, C) -> rows of W*C
    target.baddbmm_(U, rows.view(B, h, W * C))  # (B, H, h) @ (B, h, W*C), added into out
    return out


# ---------------------------------------------------------------------------------------------
# --- speed-up: a decoder's Dropout2d as a mask on its prediction layer's weights (replaces
# pointwise(self.dropout(x), ...) in AllMLPDecoder.output_layer on a CPU without gradients;
# bench.py rows mcd-decoder and mcd-decoder-plain, timed in the same run; docs/results.md)

def dropped_pointwise(x, conv, p):
    """pointwise(F.dropout2d(x, p, training=True), conv.weight, conv.bias), from the same
    draw. Dropout2d multiplies channel c of image b by m_bc (0, or 1 / (1 - p) with probability
    1 - p), and the 1x1 layer then sums over the channels: W (m_b * x) = (W diag(m_b)) x, so the
    mask can go on the (C', C) weights instead, one matrix per image, and the (B, C, h, w) map
    is not read and written once more. The mask is drawn as torch's Dropout2d draws it:
    bernoulli_(1 - p) on a tensor of B * C numbers, divided by 1 - p (tests/test_models.py)."""
    B, C = x.shape[:2]
    m = x.new_empty(B, 1, C).bernoulli_(1 - p).div_(1 - p)  # Dropout2d's (B, C, 1, 1) mask
    weight = conv.weight.flatten(1) * m  # (C', C) * (B, 1, C) -> (B, C', C)
    tokens = x.permute(0, 2, 3, 1).flatten(1, 2)  # (B, h*w, C): a view of a channels_last map
    out = torch.baddbmm(conv.bias, tokens, weight.transpose(1, 2))  # (B, h*w, C')
    return out.unflatten(1, x.shape[-2:]).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# --- speed-up: the folds kept between calls while nothing they come from changes (replaces
# stacked_folds in fused_features without gradients; bench.py rows segdepthformer and
# segdepthformer-plain-folds, timed in the same run; docs/results.md)

def kept_folds(decoders, stages):
    """stacked_folds(decoders, stages), computed once and kept on the first decoder
    (`_kept_folds`) for as long as the same decoders, in the same modes, hold the same weights
    and statistics, unwritten. Each tensor is kept as an alias, which shares its memory (so no
    other tensor can take that address meanwhile) and its version counter, which every in-place
    write advances (an optimiser step, load_state_dict; not a write through .data). The folds are
    computed with autocast off, whatever the caller's precision. Tensors that are not the
    modules' own Parameters (a stacked ensemble's, which torch.func.functional_call passes in)
    are folded afresh, as they are under torch.compile."""
    params = [p for d in decoders for p in d.parameters()]
    if torch.compiler.is_compiling() or not all(isinstance(p, nn.Parameter) for p in params):
        return stacked_folds(decoders, stages)
    tensors = params + [b for d in decoders for b in d.buffers()]
    key = (stages, len(tensors), *((id(d), d.training) for d in decoders))
    kept = getattr(decoders[0], '_kept_folds', None)
    if kept is None or kept[0] != key or not all(
            t.data_ptr() == alias.data_ptr() and t._version == version and t.dtype == alias.dtype
            for t, (alias, version) in zip(tensors, kept[1])):
        device = params[0].device.type
        with torch.autocast(device, enabled=False) if device in ('cpu', 'cuda') else nullcontext():
            folds = stacked_folds(decoders, stages)
        kept = decoders[0]._kept_folds = (key, [(t.detach(), t._version) for t in tensors], folds)
    return kept[2]
