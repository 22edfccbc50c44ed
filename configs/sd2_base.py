"""The authors' setting (docs/method.md §4): Subject-Diffusion on Stable Diffusion 2-base at 512 px.

The architecture is written out here (Stable Diffusion 2-base's UNet, VAE and OpenCLIP
ViT-H text tower, the OpenCLIP ViT-H/14 image tower), so the run can be planned without
any file: `sdjax plan --config configs/sd2_base.py --topology v5p:2x2x4`. Training needs
user-supplied weights that match it (nothing is downloaded):

    sdjax train --config configs/sd2_base.py --workdir runs/sd2 \\
        --set init.pretrained=/path/stable-diffusion-2-base \\
        --set init.image_encoder=/path/open_clip_vit_h14.safetensors \\
        --set data.path=/path/records
"""

import ml_collections

from sdjax.train.state import AUTHORS_TRAINABLE


def get_config():
    c = ml_collections.ConfigDict()
    c.model = dict(
        unet=dict(  # stabilityai/stable-diffusion-2-base unet/config.json, + 1 input channel
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            heads=(5, 10, 20, 20),  # attention_head_dim: head width 64
            cross_attention_dim=1024,
            in_channels=5,  # 4 latents + the location mask
            out_channels=4,
            sample_size=64,
            use_linear_projection=True,
            norm_num_groups=32,
            adapter=True,
            # cross-attention at 32/16/8 of 64x64 latents (docs/method.md §3d)
            probe_layers=(
                "down_blocks_1",
                "down_blocks_2",
                "mid_block",
                "up_blocks_1",
                "up_blocks_2",
            ),
            remat=True,
            dtype="bfloat16",
        ),
        text=dict(  # the OpenCLIP ViT-H text tower in transformers' CLIPTextModel layout
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=0,  # as SD 2's text_encoder/config.json says
            eos_token_id=2,
            pad_token_id=1,
            dtype="bfloat16",
            remat=True,
        ),
        image=dict(  # OpenCLIP ViT-H/14 at 224 px, frozen
            hidden_size=1280,
            intermediate_size=5120,
            projection_dim=1024,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="gelu",
            dtype="bfloat16",
        ),
        vae=dict(  # SD 2-base vae/config.json (frozen; encodes the training images)
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
            dtype="bfloat16",
        ),
        noise=dict(  # SD 2-base scheduler/scheduler_config.json
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            set_alpha_to_one=False,
        ),
        resolution=512,
        max_subjects=2,
        grounding_hidden=1024,
        single_subject_box=False,  # the authors drop box coordinates for one subject
        region_attention=True,  # beyond the paper: subjects' tokens bound to their regions
        attention="auto",  # kernel: TPU splash, GPU cuDNN, CPU XLA (sdjax.models.kernels)
    )
    c.task = "subject_diffusion"
    c.init = dict(pretrained="", image_encoder="")
    c.data = dict(
        path="",
        describe_prob=1.0,
        p_text=0.05,
        p_both=0.05,
        p_mask=0.05,
        region_box_prob=0.25,
        # reference augmentation (docs/method.md §5)
        hflip_prob=0.5,
        rotate_degrees=10.0,
        perspective=0.5,
        perspective_prob=0.5,
        shuffle=True,
        worker_count=8,
        read_threads=4,
        prefetch_buffer=64,
        toy_n=0,  # data.path holds records; no toy world is generated
        toy_seed=0,
        toy_size=64,
    )
    c.train = dict(
        num_steps=300_000,
        batch_size=256,
        lr=3e-5,
        warmup_steps=1000,
        schedule_steps=0,  # length of the decay; 0: num_steps
        decay="constant",
        clip_norm=0.0,  # the authors do not clip
        b1=0.9,  # AdamW as the authors (docs/method.md §4)
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        ema=False,
        trainable=AUTHORS_TRAINABLE,
        checkpoint_every=5000,
        log_every=50,
        seed=0,
        preview_every=0,
        preview_steps=25,
        max_to_keep=3,
        # TPU: XLA's windowed einsum for fsdp weights (sdjax.train.run.compiler_options)
        collective_matmul=False,
    )
    c.loss = dict(attn_weight=0.01, attn_form="balanced_l1", ema_decay=0.9999)
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    # First match wins where a parameter names two axes: the token table splits its rows
    # (vocab), so its gradient (batch-split lookups scattered into it) needs no reshuffle.
    c.sharding_rules = [
        ("batch", ("data", "fsdp")),
        ("vocab", "fsdp"),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
    ]
    return c
