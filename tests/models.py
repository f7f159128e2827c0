"""Small models that exercise one coupling pattern each (the lossless oracle's zoo)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(i, o, k=3, s=1, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = cbr(3, c)
        self.a = nn.Sequential(cbr(c, 24), nn.Conv2d(24, c, 3, padding=1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(cbr(c, 12), nn.Conv2d(12, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = torch.relu(torch.add(x, self.b(x)))
        return self.head(x.mean((2, 3)))


class DenseConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.l1 = cbr(16, 8)
        self.l2 = cbr(24, 8)
        self.trans = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat((x, self.l2(x)), dim=1)
        x = self.trans(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ChunkSplit(nn.Module):
    """chunk and unequal split whose parts feed different branches."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.p1 = cbr(8, 8)
        self.p2 = cbr(24, 12)
        self.q1 = cbr(16, 6)
        self.q2 = cbr(16, 10)
        self.out = nn.Conv2d(8 + 12 + 6 + 10, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = torch.split(x, [8, 24], dim=1)
        c, d = x.chunk(2, dim=1)
        return self.out(torch.cat([self.p1(a), self.p2(b), self.q1(c), self.q2(d)], 1))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class Shuffle(nn.Module):
    """a ShuffleNetV2 unit: split in two, one branch convolved, concat, shuffle."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = cbr(3, 2 * c)
        self.branch = nn.Sequential(cbr(c, c, 1), cbr(c, c, 3, g=c), cbr(c, c, 1))
        self.branch2 = nn.Sequential(cbr(c, c, 1), cbr(c, c, 1))
        self.out = nn.Conv2d(2 * c, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.branch2(x2)), 1), 2)
        return self.out(x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.g4 = cbr(32, 64, 3, g=4)
        self.dw = cbr(64, 64, 3, g=64)
        self.dw2 = nn.Conv2d(64, 128, 3, padding=1, groups=64)  # depth multiplier 2
        self.pw = nn.Conv2d(128, 16, 1)

    def forward(self, x):
        return self.pw(self.dw2(self.dw(self.g4(self.stem(x)))))


class SqueezeExcite(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.stem = cbr(3, c)
        self.fc1 = nn.Conv2d(c, 8, 1)
        self.fc2 = nn.Conv2d(8, c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s)


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 8), nn.AdaptiveAvgPool2d(4))
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


class SharedModule(nn.Module):
    """one conv applied twice (weights shared across two call sites)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.mid = cbr(16, 24)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.out(x)


class LayerScale(nn.Module):
    """a loose nn.Parameter in arithmetic (ConvNeXt/CaiT layer scale)."""

    def __init__(self, c=24):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c, 1, 1))
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(y)))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return self.out(x + y + self.bias)


class UNet(nn.Module):
    """ConvTranspose2d upsampling with a skip concat."""

    def __init__(self):
        super().__init__()
        self.enc1 = cbr(3, 16)
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), cbr(16, 32))
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec = cbr(32, 16)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d = torch.cat([self.up(e2), e1], dim=1)
        return self.out(self.dec(d))


class GatedMLP(nn.Module):
    """SwiGLU feed-forward on a token sequence."""

    def __init__(self, d=32, h=64):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        self.out = nn.Linear(d, 8)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.out(x)


class GQAttention(nn.Module):
    """hand-written grouped-query attention: 8 query heads share 2 key/value heads."""

    def __init__(self, d=32, n_head=8, n_kv=2, head_dim=8, sdpa=False, expand=False):
        super().__init__()
        self.n_head, self.n_kv, self.hd, self.sdpa, self.expand = n_head, n_kv, head_dim, sdpa, expand
        self.inp = nn.Linear(16, d)
        self.q = nn.Linear(d, n_head * head_dim)
        self.k = nn.Linear(d, n_kv * head_dim)
        self.v = nn.Linear(d, n_kv * head_dim)
        self.o = nn.Linear(n_head * head_dim, d)
        self.out = nn.Linear(d, 4)

    def _repeat(self, t):
        rep = self.n_head // self.n_kv
        if not self.expand:
            return t.repeat_interleave(rep, dim=1)
        B, kv, T, hd = t.shape
        return t[:, :, None, :, :].expand(B, kv, rep, T, hd).reshape(B, kv * rep, T, hd)

    def forward(self, x):
        x = self.inp(x)
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self._repeat(self.k(x).view(B, T, self.n_kv, self.hd).transpose(1, 2))
        v = self._repeat(self.v(x).view(B, T, self.n_kv, self.hd).transpose(1, 2))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / self.hd ** 0.5)
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hd)
        return self.out(x + self.o(y))


class SliceConst(nn.Module):
    """hard-coded slices of a channel dim, and a reshape with a literal width."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.a(x[:, :16]), self.b(x[:, 16:])], 1)  # (B, 16, H, W)
        y = y.mean((2, 3)).reshape(-1, 16)
        return self.fc(y)


class WindowAttention(nn.Module):
    """torchvision's Swin attention (a leaf function with head_dim = width // heads), shifted windows."""

    def __init__(self, c=32, heads=4):
        super().__init__()
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        self.inp = nn.Linear(16, c)
        self.attn = ShiftedWindowAttention(c, [4, 4], [2, 2], heads)
        with torch.no_grad():
            self.attn.relative_position_bias_table.normal_()
        self.out = nn.Linear(c, 8)

    def forward(self, x):  # (B, H, W, 16)
        x = self.inp(x)
        return self.out(x + self.attn(x))


class EinsumAttention(nn.Module):
    """MaxViT-style attention: einsum scores, a bias table gathered by an index buffer, D read from x.size()."""

    def __init__(self, d=32, heads=4, t=5):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.inp = nn.Linear(16, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.merge = nn.Linear(d, d)
        self.table = nn.Parameter(torch.randn(2 * t - 1, heads))
        pos = torch.arange(t)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + t - 1).flatten())
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        x = self.inp(x)
        B, T, D = x.size()
        q, k, v = torch.chunk(self.qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(B, T, self.h, self.hd).permute(0, 2, 1, 3) for t in (q, k, v))  # (B, h, T, hd)
        bias = self.table[self.index].view(T, T, -1).permute(2, 0, 1)  # (h, T, T)
        att = torch.einsum("bhid,bhjd->bhij", q, k) * self.hd ** -0.5 + bias
        y = torch.einsum("bhij,bhjd->bhid", att.softmax(-1), v)
        y = y.permute(0, 2, 1, 3).reshape(B, T, D)
        return self.out(x + self.merge(y))


class ComputedHeadDim(nn.Module):
    """timm CaiT/CoaT/VOLO attention: the head dim is computed from the residual width
    with a head count fixed in the code (``C // self.num_heads``), the merged heads
    reshaped back to ``C``; an MLP beside it. The computed size must keep its value when C shrinks."""

    def __init__(self, d=32, heads=4, hidden=64):
        super().__init__()
        self.num_heads = heads
        self.inp = nn.Linear(16, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, N, C))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.out(x)


class DecomposedRMSNorm(nn.Module):
    """Pre-norm residual blocks with RMSNorm written out as pow/mean/rsqrt (as
    Hugging Face LLaMA exports it), and a channel-mean readout at the end."""

    def __init__(self, d=16, h=32, blocks=2):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.norms = nn.ParameterList([nn.Parameter(1 + 0.1 * torch.randn(d)) for _ in range(blocks)])
        self.up = nn.ModuleList([nn.Linear(d, h) for _ in range(blocks)])
        self.down = nn.ModuleList([nn.Linear(h, d) for _ in range(blocks)])
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        x = self.inp(x)
        for w, up, down in zip(self.norms, self.up, self.down):
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
            x = x + down(F.gelu(up(n)))
        return self.out(x) + x.sum(-1, keepdim=True)


class SplitTail(nn.Module):
    """Res2Net's split: chunks of a fixed width, the last one read as ``parts[-1]``
    and the rest through a tuple slice, with a running sum between branches."""

    def __init__(self, width=6, scale=4):
        super().__init__()
        self.inp = cbr(3, width * scale, 1)
        self.width = width
        self.convs = nn.ModuleList([cbr(width, width, 3) for _ in range(scale - 1)])
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.out = nn.Conv2d(width * scale, 8, 1)

    def forward(self, x):
        parts = torch.split(self.inp(x), self.width, 1)
        head = parts[:-1]
        outs, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = head[i] if i == 0 else sp + head[i]
            sp = conv(sp)
            outs.append(sp)
        return self.out(torch.cat(outs + [self.pool(parts[-1])], 1))


class StdConv(nn.Conv2d):
    """A weight-standardized conv as timm's ``ScaledStdConv2d`` writes it: every output
    channel's weights normalized over (Cin/g, kh, kw) by ``F.batch_norm`` with batch
    statistics, times a gain, and put back with ``reshape_as``."""

    def __init__(self, cin, cout, k=1, groups=1):
        super().__init__(cin, cout, k, padding=k // 2, groups=groups)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(cout, 1, 1, 1))
        self.scale = (cin // groups * k * k) ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class WeightStandardized(nn.Module):
    """NFNet's blocks: weight-standardized convs (one grouped, few wide groups), a residual."""

    def __init__(self):
        super().__init__()
        self.stem = StdConv(3, 16, 3)
        self.conv1 = StdConv(16, 24)
        self.conv2 = StdConv(24, 24, 3, groups=3)
        self.conv3 = StdConv(24, 16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = F.silu(self.stem(x))
        x = x + self.conv3(F.silu(self.conv2(F.silu(self.conv1(x)))))
        return self.head(x)


class PaddedWindows(nn.Module):
    """TinyViT / SAM-ViT: tokens (B, H, W, C) padded to a multiple of the window with
    ``F.pad`` (a shape-dependent branch: traced with torch.export, ``aten.pad``),
    windowed attention, then cropped back."""

    def __init__(self, d=16, heads=2, win=3):
        super().__init__()
        self.win, self.heads = win, heads
        self.inp = nn.Linear(3, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        x = self.inp(x.permute(0, 2, 3, 1))  # (B, H, W, d)
        B, H, W, C = x.shape
        pad_h, pad_w = (self.win - H % self.win) % self.win, (self.win - W % self.win) % self.win
        y = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        Hp, Wp = H + pad_h, W + pad_w
        t = y.view(B, Hp // self.win, self.win, Wp // self.win, self.win, C).permute(0, 1, 3, 2, 4, 5)
        t = t.reshape(-1, self.win * self.win, C)  # (windows, win*win, d)
        q, k, v = self.qkv(t).reshape(t.shape[0], t.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        t = F.scaled_dot_product_attention(q, k, v, scale=0.5).transpose(1, 2).reshape(t.shape[0], t.shape[1], -1)
        t = self.proj(t).view(B, Hp // self.win, Wp // self.win, self.win, self.win, C).permute(0, 1, 3, 2, 4, 5)
        x = x + t.reshape(B, Hp, Wp, C)[:, :H, :W]
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.out(x.mean((1, 2)))


class ChannelStatistics(nn.Module):
    """Statistics over a pruned channel dim: ConvNeXt-V2's GlobalResponseNorm (``x.norm``
    over space, its mean over channels, ``torch.addcmul``) and CBAM's spatial attention
    (the channel max and mean of GELU outputs, some negative: a removed zero can be the max)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.gamma = nn.Parameter(0.5 * torch.randn(1, 24, 1, 1))
        self.beta = nn.Parameter(0.5 * torch.randn(1, 24, 1, 1))
        self.sa = nn.Conv2d(2, 1, 3, padding=1)
        self.out = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        x = F.gelu(self.pw(self.stem(x)))
        g = x.norm(p=2, dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        x = x + torch.addcmul(self.beta, self.gamma, x * (g / (g.mean(dim=1, keepdim=True) + 1e-6)))
        s = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], 1)  # (B, 2, H, W)
        return self.out(x * torch.sigmoid(self.sa(s)))


class Recurrent(nn.Module):
    """Sequencer2d's token mixing: a bidirectional LSTM over the tokens, its two halves
    concatenated into a linear; a two-layer GRU after it; a residual stream through both."""

    def __init__(self, d=16, h=12):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.lstm = nn.LSTM(d, h, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * h, d)
        self.gru = nn.GRU(d, h, num_layers=2, batch_first=True)
        self.fc2 = nn.Linear(h, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        x = self.inp(x)
        y, _ = self.lstm(x)  # (B, T, 2h)
        x = x + self.fc(y)
        z, _ = self.gru(x)
        return self.out(x + self.fc2(z))


IMAGE = (2, 3, 16, 16)
TOKENS = (2, 5, 16)
ORACLE_MODELS = {
    "computed_head_dim": (ComputedHeadDim, TOKENS),
    "residual": (Residual, IMAGE),
    "dense_concat": (DenseConcat, IMAGE),
    "chunk_split": (ChunkSplit, IMAGE),
    "channel_shuffle": (Shuffle, IMAGE),
    "grouped_depthwise": (Grouped, IMAGE),
    "squeeze_excite": (SqueezeExcite, IMAGE),
    "flatten_linear": (FlattenLinear, IMAGE),
    "shared_module": (SharedModule, IMAGE),
    "layer_scale": (LayerScale, IMAGE),
    "unet_convtranspose": (UNet, IMAGE),
    "gated_mlp": (GatedMLP, (2, 5, 32)),
    "gqa_matmul": (GQAttention, TOKENS),
    "gqa_sdpa": (lambda: GQAttention(sdpa=True), TOKENS),
    "gqa_expand": (lambda: GQAttention(expand=True), TOKENS),
    "slice_const": (SliceConst, IMAGE),
    "swin_window_attention": (WindowAttention, (2, 8, 8, 16)),
    "einsum_attention_bias_table": (EinsumAttention, TOKENS),
    "decomposed_rmsnorm_mean_sum": (DecomposedRMSNorm, TOKENS),
    "split_negative_index_and_tuple_slice": (SplitTail, IMAGE),
    "weight_standardized_conv": (WeightStandardized, IMAGE),
    "padded_windows_aten_pad": (PaddedWindows, (2, 3, 8, 8)),
    "channel_norm_max_addcmul": (ChannelStatistics, IMAGE),
    "lstm_gru_hidden_units": (Recurrent, TOKENS),
}


def centre_wanted(how: str) -> bool:
    """A helper a model calls through this module (``models.centre_wanted(how)``)."""
    return how == "centre"
