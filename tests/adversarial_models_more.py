"""More adversarial models (a second, independent red-team pass): constructs not in adversarial_models.py."""
import math
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from adversarial_models import C, T, ConvPair, head, image, tokens

RT = {}


def reg(name, inputs=image):
    def deco(cls):
        RT[name] = (cls, inputs)
        return cls
    return deco


def token_ids(batch):
    return (torch.randint(0, 20, (batch, T)),)


# ---------------------------------------------------------------- A. rule probes / verify blind spots
@reg("hardtanh_pos_min_gate")
class HardtanhGate(ConvPair):
    """F.hardtanh(h, 0.1, 1.0) (hardtanh(0) = 0.1) summed over channels as a gate."""
    def mid(self, h):
        return h * F.hardtanh(h, 0.1, 1.0).sum(1, keepdim=True)


@reg("detector_pixel_boxes_hardtanh")
class DetectorPixelBoxes(nn.Module):
    """YOLO-ish: class logits plus boxes decoded to pixels (x 512); the class branch
    carries a hardtanh(0.1, 1) channel-sum gate."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.cls = head(C)
        self.box = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h = self.a(x)
        h = h * F.hardtanh(h, 0.1, 1.0).sum(1, keepdim=True)
        logits = self.cls(self.b(h).mean((2, 3)))
        boxes = torch.sigmoid(self.box(x).mean((2, 3))) * 512.0
        return logits, boxes


@reg("maxpool3d_over_channels")
class MaxPool3dChannels(ConvPair):
    """F.max_pool3d on a 4-D tensor: read as unbatched (C, D, H, W), it pools
    over neighbouring channels (a local channel max)."""
    def mid(self, h):
        return F.max_pool3d(h, (3, 1, 1), stride=1, padding=(1, 0, 0))


@reg("depth_plus_logits_pool3d")
class SegMaskPlusLogits(nn.Module):
    """Segmentation model returning (class logits, mask in 0..255 pixel units);
    the class branch has a channel-neighbourhood max (max_pool3d on 4-D)."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.cls = head(C)
        self.mask = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        h = F.max_pool3d(self.a(x), (3, 1, 1), stride=1, padding=(1, 0, 0))
        return self.cls(self.b(h).mean((2, 3))), torch.sigmoid(self.mask(x)) * 10000.0


@reg("fpad_value_one_channel_mean")
class FPadValueChannelMean(ConvPair):
    """F.pad(h, value=1.0): the padded border of a dead channel is 1, and a
    channel mean reads it."""
    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(C, C, 3, padding=0)

    def mid(self, h):
        p = F.pad(h, (1, 1, 1, 1), value=1.0)
        return p * p.mean(1, keepdim=True)


@dataclass
class DetOut:
    logits: torch.Tensor
    feats: torch.Tensor


try:
    torch.export.register_dataclass(DetOut)
except Exception:  # noqa: BLE001
    pass


@reg("dataclass_output_hardtanh")
class DataclassOutput(nn.Module):
    """Returns a (pytree-registered) dataclass; the logits path carries the hardtanh gate."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        h = h * F.hardtanh(h, 0.1, 1.0).sum(1, keepdim=True)
        f = self.b(h).mean((2, 3))
        return DetOut(self.head(f), f)


@reg("bn_affine_false_channel_mean")
class BNNoAffineChannelMean(nn.Module):
    """BatchNorm2d(affine=False) with trained running stats, then a spatial gate from
    the channel mean (CBAM-style): a dead channel leaves BN as -rm/sqrt(rv)."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C, affine=False)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(C))
            self.bn.running_var.copy_(1 + torch.rand(C))
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.bn(self.a(x))
        h = h * torch.sigmoid(h.mean(1, keepdim=True))
        return self.head(self.b(h).mean((2, 3)))


@reg("sinusoidal_pe_buffer_layernorm", tokens)
class SinusoidalPE(nn.Module):
    """Vaswani-style: input projection + sinusoidal position-encoding buffer, then
    post-LayerNorm, MLP residual, LayerNorm, head."""
    def __init__(self, d=C):
        super().__init__()
        self.inp = nn.Linear(16, d)
        pos = torch.arange(T).float()[:, None]
        div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
        pe = torch.zeros(T, d)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe)
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 12)
        self.fc2 = nn.Linear(12, d)
        self.ln2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.ln1(self.inp(x) + self.pe)
        h = self.ln2(h + self.fc2(F.gelu(self.fc1(h))))
        return self.head(h.mean(1))


@reg("normalization_constant_buffers")
class NormConstBuffers(ConvPair):
    """(h - mean_buf) / std_buf with frozen per-channel statistics (buffers),
    then a softmax-free channel-mean gate."""
    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.randn(1, C, 1, 1))
        self.register_buffer("sd", 1 + torch.rand(1, C, 1, 1))

    def mid(self, h):
        z = (h - self.mu) / self.sd
        return z * torch.sigmoid(z.mean(1, keepdim=True))


@reg("bn_no_affine_no_running_stats")
class BNBatchStatsOnly(ConvPair):
    """nn.BatchNorm2d(affine=False, track_running_stats=False): always batch statistics."""
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(C, affine=False, track_running_stats=False)

    def mid(self, h):
        return self.bn(h)


@reg("segnet_maxpool_indices_unpool")
class SegNetUnpool(ConvPair):
    """SegNet: MaxPool2d(return_indices=True) then MaxUnpool2d with those indices."""
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)

    def mid(self, h):
        p, idx = self.pool(h)
        return self.unpool(p, idx)


@reg("layer_norm_shape_by_keyword", tokens)
class LayerNormKw(nn.Module):
    """F.layer_norm(h, normalized_shape=(d,), weight=..., bias=...) all by keyword but the input."""
    def __init__(self, d=C):
        super().__init__()
        self.a = nn.Linear(16, d)
        self.g = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.beta = nn.Parameter(0.1 * torch.randn(d))
        self.head = head(d)

    def forward(self, x):
        h = self.a(x)
        return self.head(F.layer_norm(h, normalized_shape=(C,), weight=self.g, bias=self.beta))


@reg("group_norm_groups_by_keyword")
class GroupNormKw(ConvPair):
    """F.group_norm(h, num_groups=4, weight=..., bias=...)."""
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(1 + 0.1 * torch.randn(C))
        self.beta = nn.Parameter(0.1 * torch.randn(C))

    def mid(self, h):
        return F.group_norm(h, num_groups=4, weight=self.g, bias=self.beta)


@reg("torch_reshape_shape_keyword")
class TorchReshapeKw(nn.Module):
    """torch.reshape(h, shape=(B, -1)) before a linear."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1, stride=4)
        self.fc = nn.Linear(C * 4, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu(self.fc(torch.reshape(h, shape=(x.shape[0], -1)))))


@reg("tensor_view_size_keyword")
class TensorViewKw(TorchReshapeKw):
    """h.view(size=(B, -1)) (keyword size) before a linear."""
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu(self.fc(h.view(size=(x.shape[0], -1)))))


@reg("expand_size_keyword")
class ExpandKw(nn.Module):
    """gate.expand(size=(B, C, H, W)) with keyword size, literal widths."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.g = nn.Conv2d(3, 1, 1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        g = torch.sigmoid(self.g(x)).expand(size=(x.shape[0], C, 8, 8))
        return self.head(self.b(h * g).mean((2, 3)))


@reg("step_counter_buffer_warmup")
class StepCounterWarmup(ConvPair):
    """A buffer counting forward calls (streaming offset / warmup): out scales
    by min(1, (step+1)/4). Checked separately: does compile leave the result's
    state where the user's model was?"""
    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.zeros(()))

    def mid(self, h):
        s = torch.clamp((self.step + 1) / 4.0, max=1.0)
        self.step += 1
        return h * s


@reg("embedding_max_norm", token_ids)
class EmbeddingMaxNorm(nn.Module):
    """nn.Embedding(max_norm=1.0): forward renormalises looked-up rows IN PLACE."""
    def __init__(self, vocab=20, d=C):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, max_norm=1.0)
        with torch.no_grad():
            self.emb.weight.mul_(3)
        self.fc1 = nn.Linear(d, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


@reg("weight_clip_in_forward")
class WeightClipForward(ConvPair):
    """WGAN-style weight clipping inside forward: self.b.weight.data.clamp_(-0.1, 0.1)."""
    def forward(self, x):
        self.b.weight.data.clamp_(-0.1, 0.1)
        h = torch.relu(self.a(x))
        return self.head(self.b(h).mean((2, 3)))


@reg("actnorm_python_flag_init")
class ActNormInit(nn.Module):
    """Glow ActNorm with data-dependent init guarded by a Python flag."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.loc = nn.Parameter(torch.zeros(1, C, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, C, 1, 1))
        self.initialized = False
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        if not self.initialized:
            with torch.no_grad():
                self.loc.data.copy_(-h.mean((0, 2, 3), keepdim=True))
                self.logs.data.copy_(-torch.log(h.std((0, 2, 3), keepdim=True) + 1e-6))
            self.initialized = True
        h = (h + self.loc) * torch.exp(self.logs)
        return self.head(self.b(h).mean((2, 3)))


@reg("batch_size_branch")
class BatchBranch(ConvPair):
    """Python branch on the batch size (paired-views models split the batch in two)."""
    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] % 2 == 0:
            h = h * 0.5
        return self.head(self.b(h).mean((2, 3)))


# ---------------------------------------------------------------- B. weightless channel mixing
@reg("var_channels_gate")
class VarChannels(ConvPair):
    def mid(self, h):
        return h * torch.sigmoid(h.var(1, keepdim=True))


@reg("std_mean_channels")
class StdMeanChannels(ConvPair):
    def mid(self, h):
        s, m = torch.std_mean(h, 1, keepdim=True)
        return (h - m) / (s + 1e-5)


@reg("vector_norm_channels")
class VectorNormChannels(ConvPair):
    def mid(self, h):
        return h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + 1e-5)


@reg("cosine_similarity_channels")
class CosineSimChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.a2 = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h, g = self.a(x), self.a2(x)
        s = F.cosine_similarity(h, g, dim=1).unsqueeze(1)
        return self.head(self.b(h * s).mean((2, 3)))


@reg("normalize_p1_channels")
class NormalizeP1(ConvPair):
    def mid(self, h):
        return F.normalize(h, p=1, dim=1)


@reg("prod_channels")
class ProdChannels(ConvPair):
    def mid(self, h):
        return h + torch.tanh(h).prod(1, keepdim=True)


@reg("cummax_channels")
class CummaxChannels(ConvPair):
    def mid(self, h):
        return torch.cummax(h, 1).values


@reg("argsort_gather_channels")
class ArgsortGather(ConvPair):
    def mid(self, h):
        idx = h.mean((2, 3), keepdim=True).argsort(1).expand_as(h)
        return torch.gather(h, 1, idx)


@reg("scatter_add_channels")
class ScatterAdd(ConvPair):
    def __init__(self):
        super().__init__()
        self.register_buffer("dst", torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))

    def mid(self, h):
        idx = self.dst.view(1, -1, 1, 1).expand_as(h)
        out = torch.zeros_like(h).scatter_add(1, idx, h)
        return out


@reg("index_add_channels")
class IndexAdd(ScatterAdd):
    def mid(self, h):
        return torch.zeros_like(h).index_add(1, self.dst, h)


@reg("masked_scatter_channels")
class MaskedScatter(ConvPair):
    def __init__(self):
        super().__init__()
        m = torch.zeros(1, C, 1, 1, dtype=torch.bool)
        m[:, ::2] = True
        self.register_buffer("m", m)

    def mid(self, h):
        return h.masked_scatter(self.m.expand_as(h), torch.tanh(h))


# ---------------------------------------------------------------- C. attention blocks
@reg("cbam_channel_attention")
class CBAMChannel(ConvPair):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(C, 4, 1), nn.ReLU(), nn.Conv2d(4, C, 1))

    def mid(self, h):
        a = self.mlp(F.adaptive_avg_pool2d(h, 1)) + self.mlp(F.adaptive_max_pool2d(h, 1))
        return h * torch.sigmoid(a)


@reg("coordinate_attention")
class CoordAtt(ConvPair):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(C, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.ch = nn.Conv2d(4, C, 1)
        self.cw = nn.Conv2d(4, C, 1)

    def mid(self, x):
        n, c, hh, ww = x.size()
        xh = F.adaptive_avg_pool2d(x, (None, 1))
        xw = F.adaptive_avg_pool2d(x, (1, None)).permute(0, 1, 3, 2)
        y = F.hardswish(self.bn1(self.conv1(torch.cat([xh, xw], dim=2))))
        yh, yw = torch.split(y, [hh, ww], dim=2)
        return x * torch.sigmoid(self.ch(yh)) * torch.sigmoid(self.cw(yw.permute(0, 1, 3, 2)))


@reg("sk_split_attention")
class SKAttention(nn.Module):
    """SKNet: two branches, fused by sum, squeezed, per-branch logits, softmax over branches."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.br = nn.ModuleList([nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=2, dilation=2)])
        self.fc = nn.Linear(C, 4)
        self.fcs = nn.ModuleList([nn.Linear(4, C) for _ in range(2)])
        self.b = nn.Conv2d(C, C, 1)
        self.head = head(C)

    def forward(self, x):
        h = torch.relu(self.a(x))
        feats = torch.stack([b(h) for b in self.br], 1)  # (B, 2, C, H, W)
        z = torch.relu(self.fc(feats.sum(1).mean((2, 3))))
        att = torch.stack([f(z) for f in self.fcs], 1).softmax(1)  # (B, 2, C)
        v = (feats * att[..., None, None]).sum(1)
        return self.head(self.b(v).mean((2, 3)))


@reg("alibi_attention", tokens)
class ALiBiAttention(nn.Module):
    def __init__(self, d=C, heads=4):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(16, 3 * d)
        self.o = nn.Linear(d, 16)
        self.head = head(16)
        slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])
        pos = torch.arange(T)
        self.register_buffer("alibi", slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None]).float())

    def forward(self, x):
        B = x.shape[0]
        q, k, v = self.qkv(x).view(B, T, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * 0.7 + self.alibi
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        return self.head(x + self.o(y))


@reg("relative_bias_table_attention", tokens)
class RelBiasAttention(nn.Module):
    def __init__(self, d=C, heads=4):
        super().__init__()
        self.h = heads
        self.q = nn.Linear(16, d)
        self.k = nn.Linear(16, d)
        self.v = nn.Linear(16, d)
        self.o = nn.Linear(d, 4)
        self.table = nn.Parameter(0.1 * torch.randn(2 * T - 1, heads))
        pos = torch.arange(T)
        self.register_buffer("rel", (pos[None, :] - pos[:, None]) + T - 1)

    def forward(self, x):
        B = x.shape[0]
        q = self.q(x).view(B, T, self.h, -1).transpose(1, 2)
        k = self.k(x).view(B, T, self.h, -1).transpose(1, 2)
        v = self.v(x).view(B, T, self.h, -1).transpose(1, 2)
        bias = self.table[self.rel].permute(2, 0, 1)  # (h, T, T)
        att = (q @ k.transpose(-2, -1)) * 0.7 + bias
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


@reg("moe_top1_dense", tokens)
class MoETop1(nn.Module):
    """Mixture of experts, top-1 routing computed densely: topk over experts,
    scatter the gate into a one-hot, weighted sum of all experts."""
    def __init__(self, e=3):
        super().__init__()
        self.inp = nn.Linear(16, C)
        self.router = nn.Linear(C, e)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(C, 12), nn.GELU(), nn.Linear(12, C)) for _ in range(e)])
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        h = self.inp(x)
        p = self.router(h).softmax(-1)
        v, i = p.topk(1, dim=-1)
        w = torch.zeros_like(p).scatter(-1, i, v)
        y = sum(w[..., j:j + 1] * ex(h) for j, ex in enumerate(self.experts))
        return self.head(h + y)


@reg("swiglu_chunk_mlp", tokens)
class SwiGLU(nn.Module):
    def __init__(self, d=16, hidden=C):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * hidden)
        self.w3 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.head(x + self.w3(F.silu(a) * b))


# ---------------------------------------------------------------- D. reshapes / einsum / sampling
@reg("flatten_chw_linear")
class FlattenCHW(nn.Module):
    """Channels merged with space (B, C*H*W) into a linear (LeNet/VGG classifier)."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1, stride=4)
        self.fc = nn.Linear(C * 4, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.a(x)).flatten(1))))


@reg("flatten_softmax_over_chw")
class FlattenSoftmax(ConvPair):
    def mid(self, h):
        B = h.shape[0]
        return h.reshape(B, -1).softmax(-1).view_as(h) * 64


@reg("spatial_channel_merge_sum")
class SpatialChannelMergeSum(ConvPair):
    """(B, C, H, W) -> (B, C*H, W), reduced over the merged dim (sum), broadcast back."""
    def mid(self, h):
        B, c, H, W = h.shape
        s = h.reshape(B, c * H, W).sum(1, keepdim=True)  # (B, 1, W)
        return h + s.unsqueeze(2)


@reg("einsum_ellipsis")
class EinsumEllipsis(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.proj = nn.Parameter(0.3 * torch.randn(C, C))
        self.head = head(C)

    def forward(self, x):
        h = torch.relu(self.a(x)).permute(0, 2, 3, 1)
        return self.head(torch.einsum("...c,dc->...d", h, self.proj).mean((1, 2)))


@reg("einsum_diagonal_repeated_letter", tokens)
class EinsumDiag(nn.Module):
    """einsum('bii->bi') on an outer product of two projections."""
    def __init__(self):
        super().__init__()
        self.p = nn.Linear(16, C)
        self.q = nn.Linear(16, C)
        self.head = head(C)

    def forward(self, x):
        p, q = self.p(x).mean(1), self.q(x).mean(1)
        outer = p[:, :, None] * q[:, None, :]
        return self.head(torch.einsum("bii->bi", outer))


@reg("einsum_broadcast_scalar_param")
class EinsumBroadcast(ConvPair):
    """einsum('bchw,c->bchw', sigmoid(h), t) with t a (1,) parameter (broadcast along c),
    then a channel sum gate."""
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.ones(1))

    def mid(self, h):
        s = torch.einsum("bchw,c->bchw", torch.sigmoid(h), self.t)
        return h * s.sum(1, keepdim=True)


@reg("grid_sample_warp")
class GridSample(ConvPair):
    def __init__(self):
        super().__init__()
        self.flow = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        B = x.shape[0]
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(B, 2, 3)
        grid = F.affine_grid(theta, list(h.shape), align_corners=False)
        grid = grid + 0.1 * torch.tanh(self.flow(x)).permute(0, 2, 3, 1)
        return self.head(self.b(F.grid_sample(h, grid, align_corners=False)).mean((2, 3)))


@reg("pixel_unshuffle")
class PixelUnshuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(4 * C, C, 1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(F.pixel_unshuffle(self.a(x), 2)).mean((2, 3)))


# ---------------------------------------------------------------- E. conv variants
@reg("conv_same_dilated")
class ConvSameDilated(ConvPair):
    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(C, C, 3, padding="same", dilation=2)


@reg("conv_transpose_output_padding")
class ConvTOutPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(C, C, 3, stride=2, padding=1, output_padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.up(torch.relu(self.a(x))))).mean((2, 3)))


@reg("conv_transpose_grouped")
class ConvTGrouped(ConvTOutPad):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(C, C, 4, stride=2, padding=1, groups=2)


@reg("conv3d_unsqueezed")
class Conv3dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, C, 3, padding=1)
        self.b = nn.Conv3d(C, C, (3, 3, 3), padding=1)
        self.head = head(C)

    def forward(self, x):
        v = x.unsqueeze(1)  # (B, 1, 3, 8, 8): RGB as depth
        return self.head(self.b(torch.relu(self.a(v))).mean((2, 3, 4)))


@reg("conv1d_strided_valid", tokens)
class Conv1dStrided(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(16, C, 3, stride=2)
        self.b = nn.Conv1d(C, C, 2, padding=1, padding_mode="reflect")
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(F.gelu(self.a(x.transpose(1, 2)))).mean(-1))


# ---------------------------------------------------------------- F. norms
@reg("instance_norm_affine")
class InstanceNormAffine(ConvPair):
    def __init__(self):
        super().__init__()
        self.n = nn.InstanceNorm2d(C, affine=True)

    def mid(self, h):
        return self.n(h)


@reg("instance_norm_functional")
class InstanceNormF(ConvPair):
    def mid(self, h):
        return F.instance_norm(h)


@reg("layernorm_no_affine_residual", tokens)
class LNNoAffine(nn.Module):
    def __init__(self, d=C):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.ln = nn.LayerNorm(d, elementwise_affine=False)
        self.fc1 = nn.Linear(d, 12)
        self.fc2 = nn.Linear(12, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(F.gelu(self.fc1(self.ln(h))))
        return self.head(h)


@reg("layernorm_bias_false_postnorm", tokens)
class LNBiasFalse(LNNoAffine):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(C, bias=False)

    def forward(self, x):
        h = self.inp(x)
        h = self.ln(h + self.fc2(F.gelu(self.fc1(h))))
        return self.head(h)


@reg("rmsnorm_module_prenorm", tokens)
class RMSNormPre(LNNoAffine):
    def __init__(self):
        super().__init__()
        self.ln = nn.RMSNorm(C)
        self.lnf = nn.RMSNorm(C, elementwise_affine=False)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(F.silu(self.fc1(self.ln(h))))
        return self.head(self.lnf(h))


@reg("batchnorm1d_tokens_transposed", tokens)
class BN1dTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, C)
        self.bn = nn.BatchNorm1d(C)
        with torch.no_grad():
            self.bn.running_mean.copy_(0.1 * torch.randn(C))
            self.bn.running_var.copy_(1 + torch.rand(C))
        self.head = head(C)

    def forward(self, x):
        return self.head(self.bn(self.inp(x).transpose(1, 2)).transpose(1, 2))


# ---------------------------------------------------------------- G. embeddings
@reg("embedding_padding_idx", token_ids)
class EmbPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, C, padding_idx=0)
        self.fc = nn.Linear(C, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, ids):
        return self.out(torch.relu(self.fc(self.emb(ids).sum(1))))


@reg("embedding_bag_mean", token_ids)
class EmbBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(20, C, mode="mean")
        self.fc = nn.Linear(C, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, ids):
        return self.out(torch.relu(self.fc(self.emb(ids))))


# ---------------------------------------------------------------- H. python-level channel code
@reg("unflatten_module_heads", tokens)
class UnflattenModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, C)
        self.unf = nn.Unflatten(-1, (2, C // 2))
        self.b = nn.Linear(C // 2, 4)

    def forward(self, x):
        return self.b(self.unf(torch.relu(self.a(x))).sum(-2))


@reg("getitem_list_channels")
class GetitemList(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(4, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.a(x)[:, [6, 1, 1, 4]]).mean((2, 3)))


@reg("python_loop_over_channels")
class LoopChannels(ConvPair):
    def mid(self, h):
        out = []
        for i in range(h.shape[1]):
            out.append(h[:, i] * (i + 1))
        return torch.stack(out, 1)


@reg("unbind_list_comprehension")
class UnbindComp(ConvPair):
    def mid(self, h):
        return torch.stack([torch.tanh(c) for c in torch.unbind(h, 1)], 1)


@reg("kwargs_forward")
class KwargsForward(ConvPair):
    def forward(self, x, **kwargs):
        scale = kwargs.get("scale", 1.0)
        h = torch.relu(self.a(x)) * scale
        return self.head(self.b(h).mean((2, 3)))


Out = namedtuple("Out", ["logits", "embedding"])


@reg("namedtuple_output")
class NamedTupleOut(ConvPair):
    def forward(self, x):
        e = self.b(torch.relu(self.a(x))).mean((2, 3))
        return Out(self.head(e), e)


# ---------------------------------------------------------------- I. element-wise with tensors
@reg("functional_prelu_param")
class FPReLU(ConvPair):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.1 + 0.1 * torch.rand(C))

    def mid(self, h):
        return F.prelu(h, self.w)


@reg("clamp_tensor_bounds")
class ClampTensor(ConvPair):
    def __init__(self):
        super().__init__()
        self.lo = nn.Parameter(-0.2 * torch.rand(1, C, 1, 1))
        self.hi = nn.Parameter(0.2 * torch.rand(1, C, 1, 1) + 0.05)

    def mid(self, h):
        return torch.clamp(h, min=self.lo, max=self.hi)


@reg("where_channel_condition")
class WhereChannel(ConvPair):
    def __init__(self):
        super().__init__()
        self.slope = nn.Parameter(0.1 * torch.rand(1, C, 1, 1))
        self.thr = nn.Parameter(0.1 * torch.randn(1, C, 1, 1))

    def mid(self, h):
        return torch.where(h > self.thr, h, self.slope * h)


@reg("hardtanh_module_shifted_sum")
class HardtanhModule(ConvPair):
    """nn.Hardtanh(-0.5, -0.1) (hardtanh(0) = -0.1) feeding a channel mean."""
    def __init__(self):
        super().__init__()
        self.act = nn.Hardtanh(-0.5, -0.1)

    def mid(self, h):
        return h + self.act(h).mean(1, keepdim=True)


@reg("stochastic_depth_eval")
class StochDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.r = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1))
        self.sd = torchvision.ops.StochasticDepth(0.2, "row")
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        h = h + self.sd(self.r(h))
        return self.head(h.mean((2, 3)))


@reg("no_grad_detach_data")
class NoGradDetach(ConvPair):
    def mid(self, h):
        with torch.no_grad():
            s = torch.sigmoid(h.detach().mean((2, 3), keepdim=True))
        return h * s + h.data * 0.1


@reg("new_zeros_then_fill")
class NewZerosFill(ConvPair):
    def mid(self, h):
        out = h.new_zeros(h.shape)
        out[:, : C // 2] = h[:, : C // 2]
        out[:, C // 2:] = torch.tanh(h[:, C // 2:])
        return out


@reg("fpad_on_channel_dim")
class FPadChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C + 2, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1))).mean((2, 3)))


@reg("cat_constant_coord_channels")
class CoordConv(nn.Module):
    """CoordConv: cat two constant coordinate channels (buffer) to the features."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
        self.register_buffer("coords", torch.stack([ys, xs])[None])
        self.b = nn.Conv2d(C + 2, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.b(torch.cat([h, self.coords.expand(h.shape[0], -1, -1, -1)], 1)).mean((2, 3)))


@reg("repeat_channels")
class RepeatChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(2 * C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.a(x).repeat(1, 2, 1, 1)).mean((2, 3)))


@reg("tile_channels")
class TileChannels(RepeatChannels):
    def forward(self, x):
        return self.head(self.b(torch.tile(self.a(x), (1, 2, 1, 1))).mean((2, 3)))


@reg("stack_then_sum_branches")
class StackSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Conv2d(3, C, 3, padding=1)
        self.q = nn.Conv2d(3, C, 1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(torch.stack([self.p(x), self.q(x)], 0).sum(0)).mean((2, 3)))


@reg("expand_single_channel_gate")
class ExpandGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.g = nn.Conv2d(3, 1, 1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.b(h * torch.sigmoid(self.g(x)).expand(-1, h.shape[1], -1, -1)).mean((2, 3)))


@reg("hard_swish_se_mobilenetv3")
class MBv3SE(ConvPair):
    def __init__(self):
        super().__init__()
        self.se = torchvision.ops.SqueezeExcitation(C, 4, scale_activation=nn.Hardsigmoid)

    def mid(self, h):
        return self.se(F.hardswish(h))


@reg("multi_output_list_of_feature_maps")
class FPNList(nn.Module):
    """Backbone returning a list of feature maps at two scales (FPN input)."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1, stride=2)
        self.l1 = nn.Conv2d(C, 4, 1)
        self.l2 = nn.Conv2d(C, 4, 1)

    def forward(self, x):
        f1 = torch.relu(self.a(x))
        f2 = torch.relu(self.b(f1))
        return [self.l1(f1), self.l2(f2)]


# ---------------------------------------------------------------- J. more
@reg("streaming_offset_buffer")
class StreamingOffset(ConvPair):
    """Streaming model: a time-offset buffer advanced every call (eval too), used in a
    sinusoidal phase added to the features (streaming TTS/ASR caches)."""
    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(()))

    def mid(self, h):
        t = self.offset + torch.arange(h.shape[-1], dtype=h.dtype)
        self.offset += h.shape[-1]
        return h + 0.1 * torch.sin(0.3 * t)


@reg("coordconv_then_layernorm2d")
class CoordConvLN(nn.Module):
    """CoordConv coordinate channels (buffer) concatenated, then a ConvNeXt-style
    LayerNorm2d over channels (permute, LayerNorm, permute back)."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
        self.register_buffer("coords", torch.stack([ys, xs])[None])
        self.ln = nn.LayerNorm(C + 2)
        self.b = nn.Conv2d(C + 2, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = torch.cat([self.a(x), self.coords.expand(x.shape[0], -1, -1, -1)], 1)
        h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.b(h).mean((2, 3)))


@reg("return_width_as_int")
class ReturnWidth(ConvPair):
    """Returns (logits, number of feature channels) read off the tensor."""
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(self.b(h).mean((2, 3))), h.shape[1]


@reg("threshold_module")
class ThresholdModule(ConvPair):
    def __init__(self):
        super().__init__()
        self.act = nn.Threshold(0.1, 0.5)

    def mid(self, h):
        return self.act(h) * torch.sigmoid(h.sum(1, keepdim=True))


@reg("transformer_encoder_layer", tokens)
class TEL(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, C)
        self.layer = nn.TransformerEncoderLayer(C, 2, 12, dropout=0.0, batch_first=True, norm_first=True)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.layer(self.inp(x)))


@reg("depthwise_multiplier2")
class DWMult(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.dw = nn.Conv2d(C, 2 * C, 3, padding=1, groups=C)
        self.b = nn.Conv2d(2 * C, C, 1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.dw(torch.relu(self.a(x))))).mean((2, 3)))


@reg("grouped_conv_positions_groupnorm")
class GConvGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(8, 16)
        self.b = nn.Conv2d(16, C, 1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.gn(self.g(torch.relu(self.a(x)))))).mean((2, 3)))


@reg("functional_embedding_max_norm", token_ids)
class FEmbMaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(3 * torch.randn(20, C))
        self.fc1 = nn.Linear(C, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(F.embedding(ids, self.w, max_norm=1.0)))).mean(1)


@reg("user_forward_hook_softmax")
class HookSoftmax(ConvPair):
    """A forward hook (registered in __init__) that softmax-normalises a's output over
    channels: invisible to the traced graph."""
    def __init__(self):
        super().__init__()
        self.a.register_forward_hook(lambda m, i, o: o.softmax(1))


@reg("lerp_ema_mix")
class LerpMix(ConvPair):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(1, C, 1, 1))

    def mid(self, h):
        return torch.lerp(h, torch.tanh(h), self.w)


@reg("addcmul_gate")
class AddcmulGate(ConvPair):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.rand(1, C, 1, 1))

    def mid(self, h):
        return torch.addcmul(h, h, self.g, value=0.5)


@reg("return_features_and_shape")
class ReturnShape(ConvPair):
    """mmdet-style: return the feature map and its shape (B, C, H, W)."""
    def forward(self, x):
        h = torch.relu(self.a(x))
        f = self.b(h)
        return self.head(f.mean((2, 3))), h.shape


@reg("fourier_pos_channels_layernorm2d")
class FourierPosLN(nn.Module):
    """8 fixed Fourier positional channels (buffer) concatenated to 8 conv channels,
    then a ConvNeXt LayerNorm2d over all 16 channels."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
        feats = [f(k * math.pi * g) for k in (1, 2) for g in (ys, xs) for f in (torch.sin, torch.cos)]
        self.register_buffer("pos", torch.stack(feats)[None])  # (1, 8, 8, 8)
        self.ln = nn.LayerNorm(2 * C)
        self.b = nn.Conv2d(2 * C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = torch.cat([self.a(x), self.pos.expand(x.shape[0], -1, -1, -1)], 1)
        h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.b(h).mean((2, 3)))


@reg("weight_norm_old_hook_api")
class WeightNormOld(ConvPair):
    """The deprecated hook-based nn.utils.weight_norm (weight_g / weight_v, weight recomputed in a pre-hook)."""
    def __init__(self):
        super().__init__()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.b = nn.utils.weight_norm(nn.Conv2d(C, C, 3, padding=1))


@reg("tensor_unfold_channel_windows")
class TensorUnfoldChannels(nn.Module):
    """h.unfold(1, 3, 1): sliding windows over channels, averaged (a channel smoothing)."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C - 2, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.a(x).unfold(1, 3, 1).mean(-1)).mean((2, 3)))



# ---------------------------------------------------------------- state a forward builds (timm ConViT GPSA)
def rel_offsets(n):
    """(1, n, n, 3): (dx, dy, dx^2 + dy^2) of every pair of n tokens on a 2-wide grid."""
    i = torch.arange(n, dtype=torch.float32)
    dx = (i % 2)[None, :] - (i % 2)[:, None]
    dy = (i // 2)[None, :] - (i // 2)[:, None]
    return torch.stack([dx, dy, dx ** 2 + dy ** 2], -1)[None]


class GPSA(nn.Module):
    """ConViT's gated positional self-attention (timm ``GPSA``): relative offsets of
    every token pair live in a buffer that starts as a (1, 1, 1, 3) placeholder and is
    rebuilt in forward whenever the token count differs (the Python branch on its
    shape sends the model to torch.export). A Linear(3, heads) turns them into
    positional scores, a per-head sigmoid gate mixes those with content attention, and
    the mix is renormalised with an in-place division."""
    def __init__(self, d=C, heads=4):
        super().__init__()
        self.h = heads
        self.qk = nn.Linear(16, 2 * d, bias=False)
        self.v = nn.Linear(16, d, bias=False)
        self.proj = nn.Linear(d, 16)
        self.pos_proj = nn.Linear(3, heads)
        self.gating = nn.Parameter(torch.randn(heads))
        self.register_buffer("rel_indices", torch.zeros(1, 1, 1, 3), persistent=False)

    def forward(self, x):
        B, N, _ = x.shape
        if self.rel_indices is None or self.rel_indices.shape[1] != N:
            self.rel_indices = rel_offsets(N)
        q, k = self.qk(x).reshape(B, N, 2, self.h, -1).permute(2, 0, 3, 1, 4)
        pos = self.pos_proj(self.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)
        patch = ((q @ k.transpose(-2, -1)) * 0.7).softmax(-1)
        gate = torch.sigmoid(self.gating.view(1, -1, 1, 1))
        attn = (1.0 - gate) * patch + gate * pos
        attn /= attn.sum(dim=-1).unsqueeze(-1)
        v = self.v(x).reshape(B, N, self.h, -1).permute(0, 2, 1, 3)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


@reg("gpsa_lazy_rel_indices", tokens)
class GPSABlock(nn.Module):
    """A ConViT block, compiled before its first call: the graph rebuilds the offsets."""
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, T, 16))  # the token count is fixed, as in ConViT
        self.attn = GPSA()
        self.head = head(16)

    def forward(self, x):
        x = x + self.pos_embed
        return self.head(x + self.attn(x))


@reg("gpsa_rel_indices_built_before_compile", tokens)
class GPSABlockBuilt(GPSABlock):
    """The same block after a first call (a user compiles a model they have run): the
    buffer holds the (1, T, T, 3) offsets and is read as it is, so its last dim is a
    group with ``pos_proj``'s input columns."""
    def __init__(self):
        super().__init__()
        self.attn.rel_indices = rel_offsets(T)


@reg("root_buffer_rebuilt_with_new_shape", tokens)
class RootBufferRebuilt(GPSA):
    """GPSA as the root module. torch.export writes a root module's re-bound buffer
    back with an in-place ``copy_`` at the end of the graph (a submodule's it drops),
    and that copy fails when the new tensor has another shape than the placeholder."""
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, T, 16))
        self.head = head(16)

    def forward(self, x):
        x = x + self.pos_embed
        return self.head(x + super().forward(x))


@reg("cumsum_channels")
class CumsumChannels(ConvPair):
    """A running sum over channels between two convs: exact after removal only because
    the removed channels are zero going in (they then repeat their predecessor)."""
    def mid(self, h):
        return torch.cumsum(h, dim=1)


@reg("cumsum_sigmoid_channels")
class CumsumSigmoidChannels(ConvPair):
    """The same running sum over ``sigmoid(h)``: a removed channel adds 0.5 to every later one."""
    def mid(self, h):
        return torch.cumsum(torch.sigmoid(h), dim=1)


@reg("topk_router_counts", tokens)
class TopkRouterCounts(nn.Module):
    """Top-2 routing whose ids are counted per expert (``histc``, times a per-expert scale)
    and also one-hot encoded to pick per-expert biases (``one_hot(ids) @ bias``, a reader
    no rule follows: the experts must stay)."""
    def __init__(self, e=4):
        super().__init__()
        self.inp = nn.Linear(16, C)
        self.router = nn.Linear(C, e, bias=False)
        self.bias = nn.Parameter(torch.randn(e, C))
        self.scale = nn.Parameter(torch.randn(e))
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        h = self.inp(x)  # (B, T, C)
        w, ids = torch.topk(self.router(h).softmax(-1), 2, dim=-1)  # (B, T, 2)
        counts = torch.histc(ids.reshape(-1).float(), bins=4, min=0, max=3)  # (E,)
        s = (counts * self.scale).sum()
        y = (w.unsqueeze(-1) * (F.one_hot(ids, 4).float() @ self.bias)).sum(-2)  # (B, T, C)
        return self.head(h + y * s)
