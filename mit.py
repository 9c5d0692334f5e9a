"""
The Mix Transformer (MiT) encoder of SegFormer (Xie et al., 2021), written from scratch.

EMUFormer and all of its baselines (SegFormer, DepthFormer, SegDepthFormer; paper Figures 1-4)
share this encoder. It turns an image (B, 3, H, W) into four feature maps at 1/4, 1/8, 1/16
and 1/32 of the input resolution, with more channels the coarser they get. Each of the four
stages is

    overlapping patch embedding   a strided conv (7x7 stride 4 for stage 1, 3x3 stride 2 after)
                                  that shrinks the map; the kernels overlap, so neighbouring
                                  tokens share pixels and no positional encoding is needed
    N transformer blocks          pre-norm residual blocks:
                                    x = x + DropPath(Attention(LN(x)))
                                    x = x + DropPath(MixFFN(LN(x)))
    LayerNorm                     then the tokens are reshaped back to a (B, C, h, w) map

Efficient self-attention: the queries are all h*w tokens, but the keys and values come from a
copy of the map shrunk by a strided conv with kernel = stride = R (the spatial-reduction ratio,
8/4/2/1 for the four stages) followed by a LayerNorm. The attention matrix is therefore
(h*w) x (h*w/R^2) instead of (h*w)^2, which is what makes a transformer affordable at 1/4 of
the input resolution.

Mix-FFN: Linear -> 3x3 depthwise conv -> GELU -> Linear. The depthwise conv leaks position
information between neighbouring tokens (this is what replaces the positional encoding).

Parameter names follow the official ImageNet checkpoints `mit_b0.pth` .. `mit_b5.pth`
(`patch_embed1.proj.weight`, `block1.0.attn.q.weight`, `block1.0.mlp.dwconv.dwconv.weight`,
`norm1.weight`, ...) so that `load_pretrained` reads them with strict key matching. The numerics
match too: qkv bias on, LayerNorm eps 1e-6 in the blocks and the four stage norms, PyTorch's
default 1e-5 in the patch embeddings and in the attention's reduction norm. `load_pretrained`
also reads Hugging Face's copies of the same weights (nvidia/mit-b0 .. b5), renaming theirs
(`from_hugging_face`: the one place their names are written).

Layout: inside a stage the tokens are kept as (B, N, C) with N = h*w in row-major order. Viewed
as a map, (B, N, C) is a (B, C, h, w) tensor in channels_last memory format, so going between
the two for the convolutions is a free view, not a copy (`tokens_to_map`, `map_to_tokens`).

The dropout layers (attention probabilities, projections, Mix-FFN) are off by default, as in
the official models; MC Dropout (uq.mc_dropout) switches them on at test time. On a CPU their
masks come from a faster generator, compiled by numba where it is installed (cpu_dropout, in
the speed-up section at the end).
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import load_strict, read_state_dict


@dataclass(frozen=True)
class MiTConfig:
    embed_dims: tuple = (64, 128, 320, 512)  # channels of the four stages
    num_heads: tuple = (1, 2, 5, 8)
    depths: tuple = (3, 4, 6, 3)             # transformer blocks per stage
    sr_ratios: tuple = (8, 4, 2, 1)          # spatial reduction of keys/values per stage
    mlp_ratio: int = 4                       # Mix-FFN hidden width = mlp_ratio * channels
    decoder_dim: int = 768                   # width of the all-MLP decoder (heads.py)


# The six encoders of SegFormer. Only the width of B0 and the depths differ; the decoder is
# 256 wide for the small two and 768 for the rest, as in the official configs.
CONFIGS = {
    'b0': MiTConfig(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256),
    'b1': MiTConfig(depths=(2, 2, 2, 2), decoder_dim=256),
    'b2': MiTConfig(depths=(3, 4, 6, 3)),
    'b3': MiTConfig(depths=(3, 4, 18, 3)),
    'b4': MiTConfig(depths=(3, 8, 27, 3)),
    'b5': MiTConfig(depths=(3, 6, 40, 3)),
}


# The smallest input side: stage 1 reduces its keys and values with an 8x8 stride-8 conv on a
# ceil(H/4) map, which needs at least 8 rows and columns, i.e. H, W >= 29.
MIN_SIZE = 29


def get_config(backbone):
    if backbone not in CONFIGS:
        raise ValueError(f"unknown backbone {backbone!r}: expected one of {', '.join(CONFIGS)}")
    return CONFIGS[backbone]


def tokens_to_map(x, H, W):
    # (B, N, C) -> (B, C, H, W): a channels_last view of the same memory, no copy
    return x.unflatten(1, (H, W)).permute(0, 3, 1, 2)


def map_to_tokens(x):
    # (B, C, H, W) -> (B, N, C): free when x is channels_last, which the convs here keep
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class OverlapPatchEmbed(nn.Module):
    """A strided conv whose kernel is larger than its stride, so patches overlap."""

    def __init__(self, in_chans, embed_dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5 here, as in the official model

    def forward(self, x):
        x = self.proj(x)  # (B, C_in, H, W) -> (B, C, h, w), h = ceil(H / stride)
        H, W = x.shape[-2:]
        return self.norm(map_to_tokens(x)), H, W


# True: on a CPU, dropout's masks come from the speed-up at the end of this file; bench.py's
# row mcd-plain sets it False (with heads.FAST_DROPOUT2D) to time torch's own dropout
FAST_DROPOUT = True
# True: there, numba's kernel makes them where numba is installed; bench.py's row mcd-numpy sets
# it False to time numpy's form of the same masks
NUMBA_DROPOUT = True


class Dropout(nn.Dropout):
    """nn.Dropout (in training mode, and under MC Dropout: zero each element with probability p,
    scale the rest by 1 / (1 - p)). On a CPU the masks come from cpu_dropout (the speed-up
    section at the end of this file)."""

    def forward(self, x):
        if not (self.training and self.p > 0):
            return x
        if FAST_DROPOUT and x.device.type == 'cpu':
            return cpu_dropout(x, self.p)
        return F.dropout(x, self.p, training=True)


def attention_with_dropout(q, k, v, drop, block=2**22):
    """softmax(q k^T / sqrt(d)) v with `drop` (a Dropout layer) on the attention probabilities,
    for MC Dropout (and --dropout training): the probabilities are materialised, which
    scaled_dot_product_attention's fast kernels avoid, so they go a block of queries at a time,
    about `block` probabilities per block. q: (B, heads, N, d), k and v: (B, heads, N_kv, d)."""
    B, heads, N, d = q.shape
    rows = max(1, block // (B * heads * k.shape[2]))
    out = []
    for start in range(0, N, rows):
        attn = (q[:, :, start:start + rows] * d ** -0.5) @ k.transpose(-2, -1)  # (B, heads, rows, N_kv)
        out.append(drop(attn.softmax(dim=-1)) @ v)
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    """Multi-head self-attention whose keys and values come from a map shrunk sr_ratio times."""

    def __init__(self, dim, num_heads, sr_ratio, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        # the module holds the rate, so that model.train()/eval() and uq.mc_dropout() switch
        # attention dropout like any other; forward applies it (attention_with_dropout)
        self.attn_drop = Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5 here, as in the official model

    def forward(self, x, H, W):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, N, C) -> (B, heads, N, C/heads)
        if self.sr_ratio > 1:
            x = self.norm(map_to_tokens(self.sr(tokens_to_map(x, H, W))))  # (B, N/R^2, C)
        kv = self.kv(x).view(B, -1, 2, self.num_heads, C // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N/R^2, C/heads)
        if self.attn_drop.training and self.attn_drop.p > 0:
            x = attention_with_dropout(q, k, v, self.attn_drop)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C/heads)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, C/heads) -> (B, N, C)
        return self.proj_drop(self.proj(x))


class DWConv(nn.Module):
    """3x3 depthwise conv on the token map (named as in the official checkpoints)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        # Its input is a channels_last view, so the weight's gradient comes out in channels_last
        # strides, which for a (C, 1, 3, 3) weight differ from the default ones in the size-1
        # dimension only (.contiguous() leaves that alone; .to(memory_format=...) restrides). The
        # weight is laid out the same way, so that the gradient matches the parameter and DDP's
        # gradient buckets (DDP copies, and warns about, a gradient of other strides).
        self.dwconv.weight = nn.Parameter(self.dwconv.weight.detach().to(memory_format=torch.channels_last))

    def forward(self, x, H, W):
        return map_to_tokens(self.dwconv(tokens_to_map(x, H, W)))


class Mlp(nn.Module):
    """Mix-FFN: Linear -> 3x3 depthwise conv -> GELU -> Linear."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = Dropout(drop)  # used twice, as in the official model

    def forward(self, x, H, W):
        x = self.drop(self.act(self.dwconv(self.fc1(x), H, W)))
        return self.drop(self.fc2(x))


class DropPath(nn.Module):
    """Stochastic depth: in training, skip a residual branch for a whole sample with
    probability p and scale the kept ones by 1/(1-p). Not a dropout layer: MC Dropout leaves it
    off."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class MixVisionTransformer(nn.Module):
    """MiT-B0..B5. forward(image) returns the four maps [(B, C_i, H/2^(i+1), W/2^(i+1))]
    for i = 1..4 (rounded up; any H and W of at least MIN_SIZE work)."""

    def __init__(self, backbone='b2', drop_path_rate=0.1):
        super().__init__()
        self.backbone = backbone
        self.config = cfg = get_config(backbone)
        # stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last
        n = sum(cfg.depths)
        rates = [drop_path_rate * j / max(n - 1, 1) for j in range(n)]
        in_chans = 3
        for i, (dim, depth) in enumerate(zip(cfg.embed_dims, cfg.depths)):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f'patch_embed{i + 1}', OverlapPatchEmbed(in_chans, dim, patch, stride))
            block_rates, rates = rates[:depth], rates[depth:]
            setattr(self, f'block{i + 1}', nn.ModuleList(
                Block(dim, cfg.num_heads[i], cfg.mlp_ratio, cfg.sr_ratios[i], r) for r in block_rates))
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dim, eps=1e-6))
            in_chans = dim
        self.apply(init_weights)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"expected images (B, 3, H, W) with H, W >= {MIN_SIZE}, got {tuple(x.shape)}")
        features = []
        for i in range(1, 5):
            x, H, W = getattr(self, f'patch_embed{i}')(x)
            for block in getattr(self, f'block{i}'):
                x = block(x, H, W)
            x = tokens_to_map(getattr(self, f'norm{i}')(x), H, W)  # (B, C, H, W), channels_last
            features.append(x)
        return features


def init_weights(m):
    """The official initialisation: truncated normal for linear layers, He (fan-out) for convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# ImageNet weights: the official files (mit_b0.pth .. mit_b5.pth) and Hugging Face's
# (nvidia/mit-b0 .. b5). Reading a file of either kind and strict loading: plumbing.py.

def load_pretrained(encoder, path):
    """Load ImageNet weights into a MixVisionTransformer: an official checkpoint, or Hugging
    Face's (a downloaded nvidia/mit-b* folder, or its model.safetensors or pytorch_model.bin),
    told apart by their parameter names. The ImageNet classifier ('head.*', 'classifier.*') is
    not part of the encoder and is dropped; the file's encoder must be the same size as
    `encoder` (one line naming both if not), and everything else must match exactly."""
    load_encoder(encoder, read_state_dict(path), path)


def load_encoder(encoder, state, path):
    """The encoder's part of a checkpoint's state dict into `encoder` (load_pretrained)."""
    state = encoder_state(state)
    found = backbone_of(state)
    if found != encoder.backbone:
        raise ValueError(f"{path} holds {found if found.startswith('an ') else f'a MiT-{found} encoder'}; "
                         f"the model's encoder is MiT-{encoder.backbone}")
    load_strict(encoder, state, path)


def encoder_state(state):
    """The encoder's tensors of a checkpoint, in the official names: Hugging Face's are renamed
    (from_hugging_face), an official file's classifier dropped, a whole SegFormer's
    'backbone.' prefix taken off."""
    if any('encoder.patch_embeddings.' in k for k in state):
        return from_hugging_face(state)
    if any(k.startswith('backbone.') for k in state):
        return {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return {k: v for k, v in state.items() if not k.startswith('head.')}


# Hugging Face's names (as their files hold them) -> the official ones. Inside
# block.{i}.{j} of theirs, block{i + 1}.{j} of ours; their attention keeps key and value apart,
# the official one stacks them as kv, [k; v] along the output channels.
HF_BLOCK_NAMES = {'layer_norm_1': 'norm1', 'layer_norm_2': 'norm2', 'attention.self.query': 'attn.q',
                  'attention.self.sr': 'attn.sr', 'attention.self.layer_norm': 'attn.norm',
                  'attention.output.dense': 'attn.proj', 'mlp.dense1': 'mlp.fc1',
                  'mlp.dwconv.dwconv': 'mlp.dwconv.dwconv', 'mlp.dense2': 'mlp.fc2'}
HF_PATCH_NAMES = {'proj': 'proj', 'layer_norm': 'norm'}  # inside patch_embeddings.{i}


def from_hugging_face(state):
    """The encoder of a Hugging Face checkpoint ('encoder.*', or 'segformer.encoder.*' in
    SegformerForImageClassification and ...ForSemanticSegmentation) in the official names. A
    name it does not know is kept as it is, for strict loading to report."""
    prefix = 'segformer.encoder.' if any(k.startswith('segformer.encoder.') for k in state) else 'encoder.'
    out, kv = {}, {}
    for name, value in state.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split('.')  # e.g. block, 0, 1, attention, self, query, weight
        module, kind = '.'.join(parts[3:-1]), parts[-1]
        if parts[0] == 'patch_embeddings' and parts[2] in HF_PATCH_NAMES:
            out[f'patch_embed{int(parts[1]) + 1}.{HF_PATCH_NAMES[parts[2]]}.{kind}'] = value
        elif parts[0] == 'layer_norm':
            out[f'norm{int(parts[1]) + 1}.{kind}'] = value
        elif parts[0] == 'block' and module in ('attention.self.key', 'attention.self.value'):
            kv.setdefault(f'block{int(parts[1]) + 1}.{parts[2]}.attn.kv.{kind}', {})[parts[-2]] = value
        elif parts[0] == 'block' and module in HF_BLOCK_NAMES:
            out[f'block{int(parts[1]) + 1}.{parts[2]}.{HF_BLOCK_NAMES[module]}.{kind}'] = value
        else:
            out[name] = value
    for name, pair in kv.items():
        out[name] = torch.cat([pair['key'], pair['value']])
    return out


def backbone_of(state):
    """The CONFIGS name of the encoder an official-named state dict holds, read from its shapes
    (the stages' widths and the number of blocks in each); else a description of them."""
    widths = tuple(state[f'patch_embed{i}.proj.weight'].shape[0] for i in range(1, 5) if f'patch_embed{i}.proj.weight' in state)
    depths = tuple(len({k.split('.')[1] for k in state if k.startswith(f'block{i}.')}) for i in range(1, 5))
    for name, cfg in CONFIGS.items():
        if (cfg.embed_dims, cfg.depths) == (widths, depths):
            return name
    return f'an encoder of widths {widths} and depths {depths}'


# ---------------------------------------------------------------------------------------------
# --- speed-up: dropout's masks on a CPU from a counter-based generator, made by numba's kernel in
# one sweep over each tensor where numba is installed (replaces F.dropout's bernoulli_ in Dropout
# above; bench.py rows mcd, mcd-plain (with heads.FAST_DROPOUT2D off too) and mcd-numpy, timed in
# the same run; docs/results.md)

# SplitMix64 (Steele, Lea and Flood, 2014): the step of its counter (2^64 divided by the golden
# ratio) and the multipliers of its output mix; the shifts too are uint64, so that numpy and
# numba compute every step in uint64, modulo 2^64
GOLDEN, MIX1, MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
S27, S30, S31 = np.uint64(27), np.uint64(30), np.uint64(31)
CHUNK = 16384  # elements of x per chunk of the kernel's sweep, meant to keep its words in a core's cache


def splitmix64(seed, j):
    """Word j of SplitMix64 started at `seed` (uint64; j an array of uint64 in numpy, one uint64
    in numba's kernel): a hash of seed + (j + 1) * GOLDEN, so that any stretch of the stream is
    computed without the words before it."""
    z = seed + (j + np.uint64(1)) * GOLDEN
    z = (z ^ (z >> S30)) * MIX1
    z = (z ^ (z >> S27)) * MIX2
    return z ^ (z >> S31)


def cpu_dropout(x, p):
    """Dropout of a CPU tensor x at rate p. torch's bernoulli_ draws one random number per
    element, which is slow on a CPU when MC Dropout runs every dropout layer; here each 64-bit
    word of SplitMix64, seeded from torch's random stream, gives four 16-bit numbers (its low 16
    bits first, as numpy's little-endian view reads them) for four elements. Read as int16 they
    are `signed` = u - 32768 with u uniform over 0..65535, and an element is kept iff
    u < k = round(65536 (1 - p)), that is signed <= k - 32769. The keep probability is then
    exactly k / 65536 (the rate p to within 2^-17: 0.2 becomes 0.199997), and the kept elements
    are scaled by 65536 / k, so the expectation is exactly x. torch.manual_seed and train.py's
    checkpoints govern the seed as they govern every other mask.

    numpy and torch compute these numbers first below. Where numba is installed, its kernel
    (dropout_kernel) computes the same numbers for float32 and float64 in one sweep over x, in
    parallel chunks (docs/results.md has what it buys), so that no result depends on whether
    numba is installed. Without gradients (MC Dropout at test time) a contiguous x is masked in
    place, as every input here is a fresh temporary of the layer before; otherwise the result is
    a new tensor."""
    if p in (0, 1):
        return F.dropout(x, p, training=True)
    k = max(1, round(65536 * (1 - p)))
    if k == 65536:  # p <= 2^-17 keeps every element (and k - 32769 would not fit in int16)
        return x
    seed, c, scale = np.uint64(int(torch.randint(2**62, ()))), k - 32769, 65536 / k
    kernel = dropout_kernel() if NUMBA_DROPOUT else None
    if kernel is None or x.dtype not in (torch.float32, torch.float64):
        words = splitmix64(seed, np.arange((x.numel() + 3) // 4, dtype=np.uint64))
        keep = torch.from_numpy(words.view(np.int16)[:x.numel()]).view(x.shape) <= c
        return (x.mul_(keep) if not x.requires_grad else x * keep).mul_(scale)
    # the same by numba's kernel; with gradients it makes the mask (0 or the scale) from ones, and
    # x is multiplied by it out of place
    out = torch.ones(x.shape, dtype=x.dtype) if x.requires_grad else x.contiguous()
    flat = out.view(-1).numpy()
    kernel(flat, seed, np.int16(c), flat.dtype.type(scale), torch.get_num_threads())
    return x * out if x.requires_grad else out


@functools.cache
def dropout_kernel():
    """cpu_dropout's words, masks and products in one sweep: numba's kernel, or None where numba
    is not installed (numba compiles it for each dtype on its first call with it).
    kernel(x, seed, c, scale, threads) scales the elements of the flat array x in place, by
    `scale` where kept and by 0 where dropped: cpu_dropout's numbers bit for bit (x * 1 * scale
    and x * 0 * scale are x * scale and x * 0). Each chunk of CHUNK elements computes its own
    words, so the chunks run in parallel, on as many threads as torch uses."""
    try:
        import numba
    except ModuleNotFoundError as error:
        if error.name != 'numba':  # numba is there but cannot be imported: say so
            raise
        return None
    word = numba.njit(splitmix64)

    @numba.njit(parallel=True)
    def kernel(x, seed, c, scale, threads):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        zero = x.dtype.type(0)  # of x's type, as scale is: the products stay in it
        for chunk in numba.prange((x.size + CHUNK - 1) // CHUNK):
            start = chunk * CHUNK
            part = x[start:start + CHUNK]  # a slice, so that the compiler can vectorise the loop over it
            words = np.empty(CHUNK // 4, np.uint64)
            for j in range((part.size + 3) // 4):  # the words of elements start .. start + part.size - 1
                words[j] = word(seed, np.uint64(start // 4 + j))
            signed = words.view(np.int16)
            for i in range(part.size):
                part[i] *= scale if signed[i] <= c else zero

    return kernel
