"""A CPU-sized tokenizer config for the training tests: 16 x 16 photos, 4 x 4 tokens."""

import pathlib

from fvq_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tokenizer_config_module():
    return config_lib.load_file(ROOT / "configs" / "tokenizer.py")


def tiny_config(**train):
    config = _tokenizer_config_module().get_config("codebook=64,dim=8,bridge=XS/2,res=16,batch=4,steps=12")
    config.model.update(ch=16, ch_mult=(1, 2, 2), z_channels=16, norm_groups=4)
    config.discriminator.update(filters=8, num_layers=2)
    config.optim.update(warmup_steps=2, lr_ref_batch=4)
    config.loss.disc_start = 6
    config.train.update(log_every=1, checkpoint_every=4, image_every=0, eval_every=0)
    config.train.update(train)
    config.eval.update(batch_size=8, num_images=16, metrics=("psnr", "ssim", "lpips", "usage"))
    return config
