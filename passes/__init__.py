"""Built-in passes; importing this package registers them."""
from . import channels_last, dce, drop_identity, fold_bn, fold_norm, fold_scale, onednn_fuse, shrink_params, sparsify_blocks  # noqa: F401
