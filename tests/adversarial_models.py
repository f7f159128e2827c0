"""Adversarial zoo: tiny models, each built around ONE construct that real model
code uses and that a structured-pruning compiler can get wrong.

Every model has at least one conv/linear whose output channels are read by
another conv/linear, and the construct sits on such channels (the ones a
naive pruner would cut). Most models also carry an unrelated prunable group
(usually the hidden layer of ``head``), so a compiler that rightly refuses to
touch the construct's channels still has something to remove.

``ADVERSARIAL = {name: (factory, make_inputs)}``; ``make_inputs(batch)``
returns the positional inputs for that batch size: images are (B, 3, 8, 8),
token sequences (B, T=5, 16).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

C = 8  # width of the channel group the construct sits on
T = 5  # sequence length of every token model


def image(batch: int) -> tuple:
    return (torch.randn(batch, 3, 8, 8),)


def tokens(batch: int) -> tuple:
    return (torch.randn(batch, T, 16),)


def vectors(batch: int) -> tuple:
    return (torch.randn(batch, 16),)


def head(c: int, out: int = 4, hidden: int = 12) -> nn.Sequential:
    """A two-layer classifier; its hidden width is a group nothing else touches."""
    return nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, out))


class ConvPair(nn.Module):
    """Base for image models: ``a`` makes the C channels the construct works on,
    ``b`` reads them, ``head`` classifies the pooled result. Subclasses
    override ``mid`` (what happens to ``a``'s output before ``b``)."""

    def __init__(self, c=C):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(c, C, 3, padding=1)
        self.head = head(C)

    def mid(self, h):
        return h

    def forward(self, x):
        h = self.mid(self.a(x))
        return self.head(self.b(h).mean((2, 3)))


# --------------------------------------------------------------------------
# 1. In-place ops written as statements (the result is thrown away)
# --------------------------------------------------------------------------
class ReluMethodStatement(ConvPair):
    """``h.relu_()`` as a bare statement, as older torchvision-style code writes it."""

    def mid(self, h):
        h.relu_()
        return h


class ReluModuleStatement(ConvPair):
    """``nn.ReLU(inplace=True)`` called for its side effect, return value ignored."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def mid(self, h):
        self.act(h)
        return h


class FunctionalReluInplaceStatement(ConvPair):
    """``F.relu(h, inplace=True)`` as a statement."""

    def mid(self, h):
        F.relu(h, inplace=True)
        return h


class MulInplaceStatement(ConvPair):
    """``y.mul_(0.5)``: a residual scaled in place (as in some ResNet variants)."""

    def mid(self, y):
        y.mul_(0.5)
        return y


class TorchReluInplace(ConvPair):
    """``torch.relu_(h)``, the functional in-place spelling."""

    def mid(self, h):
        torch.relu_(h)
        return h


class AddInplaceParam(ConvPair):
    """``h.add_(self.bias)``: a loose per-channel bias added in place."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(C, 1, 1))

    def mid(self, h):
        h.add_(self.bias)
        return h


class ClampInplaceStatement(ConvPair):
    """``h.clamp_(min=-0.1, max=0.1)``: in-place clipping as a statement."""

    def mid(self, h):
        h.clamp_(min=-0.1, max=0.1)
        return h


# --------------------------------------------------------------------------
# 2. In-place updates seen through an alias or a view
# --------------------------------------------------------------------------
class AliasIadd(nn.Module):
    """``r = h; h += y; return conv(r)``: eager PyTorch updates the tensor ``r``
    names too (the same thing happens with ``identity = x; x += out``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.y = nn.Conv2d(3, C, 1)
        self.c = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        y = self.y(x)
        r = h
        h += y
        return self.head(self.c(r).mean((2, 3)))


class AliasAddMethod(AliasIadd):
    """``r = h; h.add_(y)``: the method spelling of the aliased update."""

    def forward(self, x):
        h = self.a(x)
        r = h
        h.add_(self.y(x))
        return self.head(self.c(r).mean((2, 3)))


class SliceViewImul(ConvPair):
    """``h[:, :4] *= 2``: in-place on a slice view of the channels."""

    def mid(self, h):
        h[:, :4] *= 2
        return h


class NarrowMulInplace(ConvPair):
    """``h.narrow(1, 2, 4).mul_(3)``: in-place through a view, as a statement."""

    def mid(self, h):
        h.narrow(1, 2, 4).mul_(3)
        return h


# --------------------------------------------------------------------------
# 3. The channel width read at run time and used as a number
# --------------------------------------------------------------------------
class DivByWidth(ConvPair):
    """``h / h.shape[1]``: normalising by the channel count."""

    def mid(self, h):
        return h / h.shape[1]


class MeanTimesSize(ConvPair):
    """``h.mean(1) * h.size(1)``: a channel sum written as mean times width."""

    def mid(self, h):
        return h + h.mean(1, keepdim=True) * h.size(1)


class AttentionScaleRuntime(nn.Module):
    """Attention scaled by ``q.shape[-1] ** -0.5`` (the head dim read at run time)."""

    def __init__(self, d=C):
        super().__init__()
        self.q = nn.Linear(16, d)
        self.k = nn.Linear(16, d)
        self.v = nn.Linear(16, d)
        self.o = nn.Linear(d, 4)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return self.o(att.softmax(-1) @ v)


class GroupNormRuntimeGroups(ConvPair):
    """``F.group_norm(h, h.shape[1] // 4)``: groups of four, counted at run time."""

    def __init__(self):
        super().__init__(c=16)

    def mid(self, h):
        return F.group_norm(h, h.shape[1] // 4)


class ArangeWidth(ConvPair):
    """``torch.arange(h.shape[1])`` as a per-channel ramp (channel-index encodings)."""

    def mid(self, h):
        ramp = torch.arange(h.shape[1], dtype=h.dtype, device=h.device)
        return h * (1 + ramp.view(1, -1, 1, 1))


class LayerNormRuntimeShape(nn.Module):
    """``F.layer_norm(h, h.shape[-1:])``: the normalised shape taken from the tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, C)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        return self.head(F.layer_norm(h, h.shape[-1:]))


# --------------------------------------------------------------------------
# 4. Order statistics over channels
# --------------------------------------------------------------------------
class SortChannels(ConvPair):
    """``h.sort(dim=1).values``: channels replaced by their ranks."""

    def mid(self, h):
        return h.sort(dim=1).values


class MaxChannels(nn.Module):
    """``h.max(dim=1).values``: a spatial gate from the channel maximum."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        m = h.max(dim=1).values
        return self.head((self.b(h) * m.unsqueeze(1)).mean((2, 3)))


class TopkChannels(nn.Module):
    """``h.topk(2, dim=1).values`` fed to a conv (the two strongest responses)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(2, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.a(x).topk(2, dim=1).values).mean((2, 3)))


class TorchMaxIndexZero(MaxChannels):
    """``torch.max(h, 1)[0]``: the indexing spelling of the channel maximum."""

    def forward(self, x):
        h = self.a(x)
        m = torch.max(h, 1)[0]
        return self.head((self.b(h) + m.unsqueeze(1)).mean((2, 3)))


class CBAMSpatial(nn.Module):
    """CBAM spatial attention: channel mean and channel max, a 7x7 conv, a sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.sa = nn.Conv2d(2, 1, 7, padding=3)
        self.b = nn.Conv2d(C, C, 1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        s = torch.cat([h.mean(1, keepdim=True), torch.max(h, 1)[0].unsqueeze(1)], 1)
        h = h * torch.sigmoid(self.sa(s))
        return self.head(self.b(h).mean((2, 3)))


class SortValuesSlice(nn.Module):
    """``h.sort(dim=1).values[:, -2:]``: a slice of the sorted channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(2, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.a(x).sort(dim=1).values[:, -2:]).mean((2, 3)))


class SortOtherDim(ConvPair):
    """``h.sort(dim=-1).values``: sorting along width, per channel (prunable)."""

    def mid(self, h):
        return h.sort(dim=-1).values


# --------------------------------------------------------------------------
# 5. Reductions and normalisations whose removed entries are not zero
# --------------------------------------------------------------------------
class SigmoidSumChannels(ConvPair):
    """``torch.sigmoid(h).sum(1)``: a removed channel still contributed sigmoid(0)."""

    def mid(self, h):
        return h * torch.sigmoid(h).sum(1, keepdim=True)


class SigmoidMeanChannels(ConvPair):
    """``torch.sigmoid(h).mean(1)`` as a spatial gate."""

    def mid(self, h):
        return h * torch.sigmoid(h).mean(1, keepdim=True)


class SoftmaxChannels(ConvPair):
    """Channel-wise softmax (a removed channel still had exp(0) in the denominator)."""

    def mid(self, h):
        return h.softmax(dim=1)


class LogSumExpChannels(ConvPair):
    """``torch.logsumexp(h, 1)`` (a soft max over channels) added back as a bias."""

    def mid(self, h):
        return h - torch.logsumexp(h, 1, keepdim=True)


class ScaledStdConv2d(nn.Conv2d):
    """NFNet's weight-standardised conv: every filter centred and scaled by
    its std over (in_channels, kh, kw), times a learnable gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x):
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean((1, 2, 3), keepdim=True)
        var = w.var((1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(var * fan_in + 1e-4) * self.gain
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WeightStdSubclass(ConvPair):
    """A Conv2d subclass standardising its weight over input channels (ScaledStdConv2d)."""

    def __init__(self):
        super().__init__()
        self.b = ScaledStdConv2d(C, C, 3, padding=1)


class WeightStdFunctional(nn.Module):
    """Weight standardisation written inline around ``F.conv2d`` (BiT / GN+WS code)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.w = nn.Parameter(torch.randn(C, C, 3, 3))
        self.bias = nn.Parameter(torch.zeros(C))
        self.head = head(C)

    def forward(self, x):
        h = torch.relu(self.a(x))
        w = self.w
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self.head(F.conv2d(h, w, self.bias, padding=1).mean((2, 3)))


class LayerNormCHW(ConvPair):
    """``nn.LayerNorm([C, H, W])`` over a conv output."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm([C, 8, 8])

    def mid(self, h):
        return self.norm(h)


class GroupNormOneGroup(ConvPair):
    """``nn.GroupNorm(1, C)``: statistics over all channels together."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(1, C)

    def mid(self, h):
        return self.norm(h)


class HandLayerNorm(nn.Module):
    """LayerNorm written out: mean-centred variance, rsqrt, affine."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, C)
        self.g = nn.Parameter(1 + 0.1 * torch.randn(C))
        self.beta = nn.Parameter(0.1 * torch.randn(C))
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * self.g + self.beta
        return self.head(h)


class ViTResidual(nn.Module):
    """A ViT in miniature: patch-embed conv, position embedding, pre-norm MLP
    blocks on a residual stream, final LayerNorm, mean-pooled head."""

    def __init__(self, d=16, hidden=24, blocks=2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 4, d))
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(blocks)])
        self.fc1 = nn.ModuleList([nn.Linear(d, hidden) for _ in range(blocks)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, d) for _ in range(blocks)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, 4, d)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(F.gelu(fc1(norm(x))))
        return self.head(self.norm(x).mean(1))


class NormalizeChannels(ConvPair):
    """``F.normalize(h, dim=1)``: an L2 norm over channels (zeros do not count: prunable)."""

    def mid(self, h):
        return F.normalize(h, dim=1)


# --------------------------------------------------------------------------
# 6. One weight tensor shared by two layers
# --------------------------------------------------------------------------
class TiedSquareLinears(nn.Module):
    """``self.b.weight = self.a.weight``: two square layers share a weight but
    read different branches (weight-tied siamese / recurrent-unrolled code)."""

    def __init__(self):
        super().__init__()
        self.p1 = nn.Linear(16, C)
        self.p2 = nn.Linear(16, C)
        self.a = nn.Linear(C, C)
        self.b = nn.Linear(C, C)
        self.b.weight = self.a.weight
        self.head = head(2 * C)

    def forward(self, x):
        ya = self.a(torch.relu(self.p1(x)))
        yb = self.b(torch.tanh(self.p2(x)))
        return self.head(torch.cat([ya, yb], -1))


class TiedEmbeddingHead(nn.Module):
    """A language model whose output layer is the embedding matrix (GPT-2 weight tying)."""

    def __init__(self, vocab=20, d=C):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 12)
        self.fc2 = nn.Linear(12, d)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return F.linear(h, self.emb.weight)


def token_ids(batch: int) -> tuple:
    return (torch.randint(0, 20, (batch, T)),)


# --------------------------------------------------------------------------
# 7. nn.MultiheadAttention and its attention weights
# --------------------------------------------------------------------------
class MHAReturnWeights(nn.Module):
    """``nn.MultiheadAttention`` with the default need_weights=True; the model
    returns the (head-averaged) attention weights next to its prediction."""

    def __init__(self, d=C):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.head = head(d)

    def forward(self, x):
        h = self.inp(x)
        out, w = self.attn(h, h, h)
        return self.head(h + out), w


class MHAIgnoreWeights(MHAReturnWeights):
    """The same layer with the attention weights computed and dropped."""

    def forward(self, x):
        h = self.inp(x)
        out, _ = self.attn(h, h, h)
        return self.head(h + out)


# --------------------------------------------------------------------------
# 8. Keyword inputs
# --------------------------------------------------------------------------
class ModuleKeywordInput(ConvPair):
    """``self.b(input=h)``: a module called with its input by keyword."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(self.b(input=h).mean((2, 3)))


class FunctionalConvKeywords(nn.Module):
    """``F.conv2d(x, weight=self.w, bias=None, padding=1)``: all by keyword."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.w = nn.Parameter(0.2 * torch.randn(C, C, 3, 3))
        self.head = head(C)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(F.conv2d(h, weight=self.w, bias=None, padding=1).mean((2, 3)))


# --------------------------------------------------------------------------
# 9. Nothing prunable: the only group goes through a blocking op
# --------------------------------------------------------------------------
class BlockedOnly(nn.Module):
    """Two convs joined through a channel sort and no other layer: a correct
    compiler removes nothing (and must still return a copy, not the user's
    parameters)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x).sort(dim=1).values)


# --------------------------------------------------------------------------
# 10. Indexing channels with buffers
# --------------------------------------------------------------------------
class BoolMaskChannels(nn.Module):
    """``h[:, self.mask]`` with a boolean buffer choosing channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.register_buffer("mask", torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool))
        self.b = nn.Conv2d(6, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.a(x)[:, self.mask]).mean((2, 3)))


class IndexSelectBuffer(nn.Module):
    """``h.index_select(1, self.idx)`` with a long buffer (repeats and reordering)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.register_buffer("idx", torch.tensor([7, 0, 3, 3, 5, 1]))
        self.b = nn.Conv2d(6, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.a(x).index_select(1, self.idx)).mean((2, 3)))


class GatherChannels(IndexSelectBuffer):
    """``torch.gather`` over channels with an index buffer expanded to the batch."""

    def forward(self, x):
        h = self.a(x)
        B, _, H, W = h.shape
        idx = self.idx.view(1, -1, 1, 1).expand(B, -1, H, W)
        return self.head(self.b(torch.gather(h, 1, idx)).mean((2, 3)))


class BufferScaleChannels(ConvPair):
    """A per-channel scale kept in a buffer, not a parameter (frozen affine)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.randn(1, C, 1, 1))

    def mid(self, h):
        return h * self.scale


class PReLUChannels(ConvPair):
    """``nn.PReLU(C)``: one learned slope per channel."""

    def __init__(self):
        super().__init__()
        self.act = nn.PReLU(C, init=0.1)

    def mid(self, h):
        return self.act(h)


# --------------------------------------------------------------------------
# 11. Consumers and rearrangements found in real models
# --------------------------------------------------------------------------
class LSTMConsumer(nn.Module):
    """A linear feeding ``nn.LSTM`` (its weight_ih columns read the channels)."""

    rnn_type = nn.LSTM

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, C)
        self.rnn = self.rnn_type(C, 12, batch_first=True)
        self.head = head(12)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.inp(x)))
        return self.head(y)


class GRUConsumer(LSTMConsumer):
    """A linear feeding ``nn.GRU``."""

    rnn_type = nn.GRU


class PixelShuffleModel(nn.Module):
    """Sub-pixel upsampling (ESPCN): C*4 channels become C channels at 2x resolution."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4 * 4, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.b = nn.Conv2d(4, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(self.up(self.a(x))).mean((2, 3)))


class UnfoldChannels(nn.Module):
    """``F.unfold`` patches (C*9 features per location) into a linear layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(4 * 9, C)
        self.head = head(C)

    def forward(self, x):
        cols = F.unfold(self.a(x), 3, padding=1).transpose(1, 2)  # (B, L, C*9)
        return self.head(self.lin(cols).mean(1))


class InterpolateChannels(ConvPair):
    """``F.interpolate`` bilinear upsampling between two convs (FPN top-down path)."""

    def mid(self, h):
        return F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)


class EinsumContraction(nn.Module):
    """``torch.einsum('bchw,dc->bdhw', h, self.proj)``: a 1x1 conv written as einsum."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.proj = nn.Parameter(0.3 * torch.randn(C, C))
        self.head = head(C)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(torch.einsum("bchw,dc->bdhw", h, self.proj).mean((2, 3)))


class BmmContraction(nn.Module):
    """``torch.bmm(u, v.transpose(1, 2))``: a bilinear score contracting a prunable dim."""

    def __init__(self):
        super().__init__()
        self.u = nn.Linear(16, C)
        self.v = nn.Linear(16, C)
        self.w = nn.Linear(16, C)
        self.head = head(C)

    def forward(self, x):
        s = torch.bmm(self.u(x), self.v(x).transpose(1, 2)) / 8.0  # (B, T, T)
        return self.head(torch.bmm(s.softmax(-1), self.w(x)))


class AttentionQK(nn.Module):
    """Hand-written attention: q and k from different linears, ``q @ k.transpose``, constant scale."""

    def __init__(self, d=C):
        super().__init__()
        self.q = nn.Linear(16, d)
        self.k = nn.Linear(16, d)
        self.v = nn.Linear(16, d)
        self.o = nn.Linear(d, 4)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = (q @ k.transpose(-2, -1)) * 0.35
        return self.o(att.softmax(-1) @ v)


class CircularConv(ConvPair):
    """``nn.Conv2d(padding_mode='circular')`` reading the channels (periodic domains)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(C, C, 3, padding=1, padding_mode="circular")


class FPadCircular(ConvPair):
    """``F.pad(h, (1, 1, 1, 1), mode='circular')`` before an unpadded conv."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(C, C, 3)

    def mid(self, h):
        return F.pad(h, (1, 1, 1, 1), mode="circular")


class DictOutput(nn.Module):
    """A detection-style dict output that also returns the backbone feature map."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        f = torch.relu(self.a(x))
        return {"logits": self.head(self.b(f).mean((2, 3))), "features": f}


class TupleOutput(DictOutput):
    """``return logits, embedding``: the pooled features a retrieval model exposes."""

    def forward(self, x):
        emb = self.b(torch.relu(self.a(x))).mean((2, 3))
        return self.head(emb), emb


class TwoInputs(nn.Module):
    """An image and a side vector, fused by addition (multimodal / conditioning)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.vec = nn.Linear(6, C)
        self.head = head(C)

    def forward(self, img, vec):
        f = self.a(img).mean((2, 3)) + self.vec(vec)
        return self.head(torch.relu(f))


def image_and_vector(batch: int) -> tuple:
    return (torch.randn(batch, 3, 8, 8), torch.randn(batch, 6))


class SharedSubmoduleTwice(nn.Module):
    """One MLP block applied to two branches (siamese towers sharing weights)."""

    def __init__(self):
        super().__init__()
        self.p1 = nn.Linear(16, C)
        self.p2 = nn.Linear(16, C)
        self.block = nn.Sequential(nn.Linear(C, 12), nn.ReLU(), nn.Linear(12, C))
        self.out = nn.Linear(C, 4)

    def forward(self, x):
        return self.out(self.block(self.p1(x)) + self.block(torch.tanh(self.p2(x))))


class CumsumChannels(ConvPair):
    """``h.cumsum(1)``: running sums over channels."""

    def mid(self, h):
        return h.cumsum(1)


class SigmoidCumsumChannels(ConvPair):
    """``torch.sigmoid(h).cumsum(1)``: cumulative gates (a removed channel adds sigmoid(0))."""

    def mid(self, h):
        return torch.sigmoid(h).cumsum(1)


class FlipChannels(ConvPair):
    """``torch.flip(h, [1])``: channels in reverse order."""

    def mid(self, h):
        return torch.flip(h, [1])


class RollChannels(ConvPair):
    """``torch.roll(h, 1, dims=1)``: channels rotated by one."""

    def mid(self, h):
        return torch.roll(h, 1, dims=1)


class ChunkReversedConcat(ConvPair):
    """``a, b = h.chunk(2, 1); cat([b, a])``: halves swapped."""

    def mid(self, h):
        p, q = h.chunk(2, 1)
        return torch.cat([q, p], 1)


class MatrixT(nn.Module):
    """``(self.w @ h.T).T``: a linear layer written with the 2-D transpose."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, C)
        self.w = nn.Parameter(0.3 * torch.randn(12, C))
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu((self.w @ h.T).T))


class BatchedMT(nn.Module):
    """``h.mT`` to put features first for a Conv1d over time, and back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, C)
        self.conv = nn.Conv1d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(self.conv(h.mT).mT)


class SEViewRuntime(nn.Module):
    """Squeeze-excite as torchvision writes it: ``b, c, _, _ = x.size()``, ``view(b, c)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.fc1 = nn.Linear(C, 4)
        self.fc2 = nn.Linear(4, C)
        self.b = nn.Conv2d(C, C, 1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        b, c, _, _ = h.size()
        y = F.adaptive_avg_pool2d(h, 1).view(b, c)
        y = torch.sigmoid(self.fc2(torch.relu(self.fc1(y)))).view(b, c, 1, 1)
        return self.head(self.b(h * y).mean((2, 3)))


class ChannelLastLinear(nn.Module):
    """ConvNeXt-style ``permute(0, 2, 3, 1)``, a linear over channels, permute back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.pw = nn.Linear(C, C)
        self.b = nn.Conv2d(C, C, 1)
        self.head = head(C)

    def forward(self, x):
        h = self.pw(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.b(h).mean((2, 3)))


# --------------------------------------------------------------------------
# More variants: constructs from specific published architectures
# --------------------------------------------------------------------------
class SubChannelMeanInplace(ConvPair):
    """``h.sub_(h.mean(1, keepdim=True))``: in-place centring over channels."""

    def mid(self, h):
        h.sub_(h.mean(1, keepdim=True))
        return h


class UnflattenViewInplace(ConvPair):
    """``h.unflatten(1, (2, -1))[:, 1].mul_(0.5)``: in-place on a view of the second half."""

    def mid(self, h):
        h.unflatten(1, (2, -1))[:, 1].mul_(0.5)
        return h


class PartialConvSetitem(nn.Module):
    """FasterNet's PConv: ``x = x.clone(); x[:, :k] = conv(x[:, :k])``, the
    first channels convolved and written back in place."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.partial = nn.Conv2d(C // 4, C // 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(C, C, 1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x).clone()
        h[:, : C // 4] = self.partial(h[:, : C // 4])
        return self.head(self.b(h).mean((2, 3)))


class ArgmaxChannelsAsNumber(ConvPair):
    """``h.argmax(1)`` (a channel index) used as a number."""

    def mid(self, h):
        return h + h.argmax(1, keepdim=True).to(h.dtype)


class MinibatchStddev(nn.Module):
    """StyleGAN's minibatch-stddev layer: the batch std averaged over channels,
    appended as one extra channel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C + 1, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        B, _, H, W = h.shape
        s = h.std(0, keepdim=True).mean((1, 2, 3), keepdim=True).expand(B, 1, H, W)
        return self.head(self.b(torch.cat([h, s], 1)).mean((2, 3)))


class LocalResponseNorm(ConvPair):
    """AlexNet/GoogLeNet ``nn.LocalResponseNorm(3)``: each channel divided by its neighbours' energy."""

    def __init__(self):
        super().__init__()
        self.lrn = nn.LocalResponseNorm(3, alpha=1.0, beta=0.75, k=1.0)

    def mid(self, h):
        return self.lrn(h)


class ECAGate(ConvPair):
    """ECA-Net: a Conv1d slid along the channel axis of the pooled features."""

    def __init__(self):
        super().__init__()
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def mid(self, h):
        y = F.adaptive_avg_pool2d(h, 1)  # (B, C, 1, 1)
        y = self.eca(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return h * torch.sigmoid(y)


class SDPAImplicitScale(nn.Module):
    """``F.scaled_dot_product_attention`` on one head: its default scale is
    1/sqrt(q.shape[-1]), read from the (prunable) width."""

    def __init__(self, d=C):
        super().__init__()
        self.q = nn.Linear(16, d)
        self.k = nn.Linear(16, d)
        self.v = nn.Linear(16, d)
        self.o = nn.Linear(d, 4)

    def forward(self, x):
        return self.o(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    """LLaMA rotary embedding on q and k: ``rotate_half`` pairs dim i with
    i + d/2, frequencies from a non-persistent ``inv_freq`` buffer."""

    def __init__(self, d=C):
        super().__init__()
        self.q = nn.Linear(16, d)
        self.k = nn.Linear(16, d)
        self.v = nn.Linear(16, d)
        self.o = nn.Linear(d, 4)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        t = torch.arange(x.shape[1], dtype=x.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q, k = self.q(x), self.k(x)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        att = (q @ k.transpose(-2, -1)) * 0.35
        return self.o(att.softmax(-1) @ self.v(x))


class WeightNormParametrization(ConvPair):
    """``nn.utils.parametrizations.weight_norm`` on the consumer (HiFi-GAN / WaveNet style)."""

    def __init__(self):
        super().__init__()
        self.b = nn.utils.parametrizations.weight_norm(nn.Conv2d(C, C, 3, padding=1))


class SpectralNormHook(ConvPair):
    """``nn.utils.spectral_norm`` (the hook version, SN-GAN discriminators): u and v
    buffers sized by the layer's output and input widths."""

    def __init__(self):
        super().__init__()
        self.b = nn.utils.spectral_norm(nn.Conv2d(C, C, 3, padding=1))


class SlimmableWeightSlice(nn.Module):
    """Slimmable / once-for-all layers: ``self.weight[:, :x.shape[1]]``, the weight
    sliced to the width of the input at run time."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.w = nn.Parameter(0.2 * torch.randn(C, C + 4, 3, 3))
        self.head = head(C)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(F.conv2d(h, self.w[:, : h.shape[1]], padding=1).mean((2, 3)))


class ModuleAttrWidth(nn.Module):
    """``h.reshape(h.size(0), self.a.out_channels, -1)``: a width from a module attribute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        return self.head(h.reshape(h.size(0), self.a.out_channels, -1).mean(-1))


class GLUChannels(nn.Module):
    """``F.glu(h, dim=1)``: the first half gated by the sigmoid of the second (ConvS2S)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2 * C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(F.glu(self.a(x), dim=1)).mean((2, 3)))


class ChannelShuffleModule(ConvPair):
    """``nn.ChannelShuffle(2)``, the module form of ShuffleNet's shuffle."""

    def __init__(self):
        super().__init__()
        self.shuffle = nn.ChannelShuffle(2)

    def mid(self, h):
        return self.shuffle(h)


class DepthwiseRuntimeGroups(nn.Module):
    """A functional depthwise conv with ``groups=h.shape[1]``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.dw = nn.Parameter(torch.randn(C, 1, 3, 3))
        self.b = nn.Conv2d(C, C, 1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        h = F.conv2d(h, self.dw, padding=1, groups=h.shape[1])
        return self.head(self.b(h).mean((2, 3)))


class DynamicSplitHalf(nn.Module):
    """``torch.split(h, h.shape[1] // 2, 1)`` into two branches."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.p = nn.Conv2d(C // 2, C, 1)
        self.q = nn.Conv2d(C // 2, C, 1)
        self.head = head(C)

    def forward(self, x):
        h = self.a(x)
        u, v = torch.split(h, h.shape[1] // 2, 1)
        return self.head((self.p(u) * torch.sigmoid(self.q(v))).mean((2, 3)))


class DiffChannels(nn.Module):
    """``torch.diff(h, dim=1)``: differences of neighbouring channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C - 1, C, 3, padding=1)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.b(torch.diff(self.a(x), dim=1)).mean((2, 3)))


class ClsTokenResidual(nn.Module):
    """A ViT residual stream without norms: a class token expanded over the
    batch and concatenated, position embedding, MLP blocks, ``x[:, 0]`` read out."""

    def __init__(self, d=16, hidden=24):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, d))
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


class BilinearTwoGroups(nn.Module):
    """``nn.Bilinear`` reading two different channel groups."""

    def __init__(self):
        super().__init__()
        self.p = nn.Linear(16, C)
        self.q = nn.Linear(16, 6)
        self.bil = nn.Bilinear(C, 6, C)
        self.head = head(C)

    def forward(self, x):
        return self.head(self.bil(torch.relu(self.p(x)), torch.tanh(self.q(x))))


class FunctionalBatchNormBuffers(ConvPair):
    """``F.batch_norm`` with running-stat buffers and affine parameters passed in (eval)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rm", 0.1 * torch.randn(C))
        self.register_buffer("rv", 1 + torch.rand(C))
        self.g = nn.Parameter(1 + 0.1 * torch.randn(C))
        self.beta = nn.Parameter(0.1 * torch.randn(C))

    def mid(self, h):
        return F.batch_norm(h, self.rm, self.rv, self.g, self.beta, training=False)


ADVERSARIAL = {
    # 1. in-place statements
    "inplace_relu_method_statement": (ReluMethodStatement, image),
    "inplace_relu_module_statement": (ReluModuleStatement, image),
    "inplace_functional_relu_statement": (FunctionalReluInplaceStatement, image),
    "inplace_mul_statement": (MulInplaceStatement, image),
    "inplace_torch_relu_": (TorchReluInplace, image),
    "inplace_add_param": (AddInplaceParam, image),
    "inplace_clamp_statement": (ClampInplaceStatement, image),
    # 2. aliases and views
    "alias_iadd": (AliasIadd, image),
    "alias_add_method": (AliasAddMethod, image),
    "slice_view_imul": (SliceViewImul, image),
    "narrow_view_mul_": (NarrowMulInplace, image),
    # 3. width read at run time
    "runtime_width_div": (DivByWidth, image),
    "runtime_mean_times_size": (MeanTimesSize, image),
    "runtime_attention_scale": (AttentionScaleRuntime, tokens),
    "runtime_group_norm_groups": (GroupNormRuntimeGroups, image),
    "runtime_arange_width": (ArangeWidth, image),
    "runtime_layer_norm_shape": (LayerNormRuntimeShape, tokens),
    # 4. order statistics
    "sort_channels_values": (SortChannels, image),
    "max_channels_values": (MaxChannels, image),
    "topk_channels_values": (TopkChannels, image),
    "torch_max_index0": (TorchMaxIndexZero, image),
    "cbam_spatial_mean_max": (CBAMSpatial, image),
    "sort_values_slice": (SortValuesSlice, image),
    "sort_other_dim": (SortOtherDim, image),
    # 5. reductions / normalisations with non-zero removed entries
    "sigmoid_sum_channels": (SigmoidSumChannels, image),
    "sigmoid_mean_channels": (SigmoidMeanChannels, image),
    "softmax_channels": (SoftmaxChannels, image),
    "logsumexp_channels": (LogSumExpChannels, image),
    "weight_std_subclass": (WeightStdSubclass, image),
    "weight_std_functional": (WeightStdFunctional, image),
    "layernorm_chw": (LayerNormCHW, image),
    "groupnorm_one_group": (GroupNormOneGroup, image),
    "hand_layernorm": (HandLayerNorm, tokens),
    "vit_residual_stream": (ViTResidual, image),
    "normalize_channels": (NormalizeChannels, image),
    # 6. shared weights
    "tied_square_linears": (TiedSquareLinears, tokens),
    "tied_embedding_head": (TiedEmbeddingHead, token_ids),
    # 7. multi-head attention
    "mha_return_weights": (MHAReturnWeights, tokens),
    "mha_ignore_weights": (MHAIgnoreWeights, tokens),
    # 8. keyword inputs
    "module_keyword_input": (ModuleKeywordInput, image),
    "functional_conv_keywords": (FunctionalConvKeywords, image),
    # 9. nothing prunable
    "blocked_only": (BlockedOnly, image),
    # 10. buffers indexing channels
    "bool_mask_channels": (BoolMaskChannels, image),
    "index_select_buffer": (IndexSelectBuffer, image),
    "gather_channels": (GatherChannels, image),
    "buffer_scale_channels": (BufferScaleChannels, image),
    "prelu_channels": (PReLUChannels, image),
    # 11. consumers and rearrangements
    "lstm_consumer": (LSTMConsumer, tokens),
    "gru_consumer": (GRUConsumer, tokens),
    "pixel_shuffle": (PixelShuffleModel, image),
    "unfold_channels": (UnfoldChannels, image),
    "interpolate_channels": (InterpolateChannels, image),
    "einsum_contraction": (EinsumContraction, image),
    "bmm_contraction": (BmmContraction, tokens),
    "attention_q_k_transpose": (AttentionQK, tokens),
    "circular_padding_conv": (CircularConv, image),
    "circular_f_pad": (FPadCircular, image),
    "dict_output_with_features": (DictOutput, image),
    "tuple_output_with_embedding": (TupleOutput, image),
    "two_inputs": (TwoInputs, image_and_vector),
    "shared_submodule_twice": (SharedSubmoduleTwice, tokens),
    "cumsum_channels": (CumsumChannels, image),
    "sigmoid_cumsum_channels": (SigmoidCumsumChannels, image),
    "flip_channels": (FlipChannels, image),
    "roll_channels": (RollChannels, image),
    "chunk_reversed_concat": (ChunkReversedConcat, image),
    "matrix_T": (MatrixT, vectors),
    "batched_mT_conv1d": (BatchedMT, tokens),
    "se_view_runtime_shape": (SEViewRuntime, image),
    "channels_last_linear": (ChannelLastLinear, image),
    # more variants
    "inplace_sub_channel_mean": (SubChannelMeanInplace, image),
    "unflatten_view_mul_": (UnflattenViewInplace, image),
    "partial_conv_setitem": (PartialConvSetitem, image),
    "argmax_channels_as_number": (ArgmaxChannelsAsNumber, image),
    "minibatch_stddev": (MinibatchStddev, image),
    "local_response_norm": (LocalResponseNorm, image),
    "eca_conv1d_over_channels": (ECAGate, image),
    "sdpa_implicit_scale": (SDPAImplicitScale, tokens),
    "rotary_embedding": (RotaryAttention, tokens),
    "weight_norm_parametrization": (WeightNormParametrization, image),
    "spectral_norm_hook": (SpectralNormHook, image),
    "slimmable_weight_slice": (SlimmableWeightSlice, image),
    "module_attr_width": (ModuleAttrWidth, image),
    "glu_channels": (GLUChannels, image),
    "channel_shuffle_module": (ChannelShuffleModule, image),
    "depthwise_runtime_groups": (DepthwiseRuntimeGroups, image),
    "dynamic_split_half": (DynamicSplitHalf, image),
    "diff_channels": (DiffChannels, image),
    "cls_token_residual": (ClsTokenResidual, image),
    "bilinear_two_groups": (BilinearTwoGroups, tokens),
    "functional_batch_norm_buffers": (FunctionalBatchNormBuffers, image),
}
