"""The embedded default model: Subject-Diffusion on the toy world, trained on a laptop CPU.

Pixel space (no VAE) at 32 px, up to 3 subjects, a text vocabulary of the toy world's
words only. `data.path` empty means WORKDIR/data, generated on first use.

    sdjax train --config configs/toy.py --workdir workdirs/toy
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = dict(
        unet=dict(
            # Sized for a 2-core CPU: convolutions at 32/16/8 px, attention (and the
            # adapters) at 16 and 8 px, where a 32 px scene's subjects are 4-8 and 2-4
            # cells wide: enough cells for a subject's region to carry its outline.
            block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            heads=(1, 2, 2),
            cross_attention_dim=64,
            in_channels=4,  # RGB + the location mask
            out_channels=3,
            sample_size=32,
            norm_num_groups=8,
            use_linear_projection=True,
            adapter=True,
            # the attention-map loss where the cross-attention is (docs/method.md §3d)
            probe_layers=(
                "down_blocks_1",
                "down_blocks_2",
                "mid_block",
                "up_blocks_0",
                "up_blocks_1",
            ),
        ),
        text=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=40,
            hidden_act="gelu",
        ),
        image=dict(
            hidden_size=64,
            intermediate_size=256,
            projection_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
        ),
        vae=None,
        # Pixel space at 32 px needs a schedule that ends in pure noise: under Stable
        # Diffusion's scaled_linear, x_T keeps 7% of the image, whose mean colour the model
        # learns to read (Lin et al. 2024), so pure-noise sampling draws random tints.
        noise=dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            steps_offset=0,
            set_alpha_to_one=True,
        ),
        resolution=32,
        max_subjects=3,
        auto_box_fill=0.45,  # toy subjects span 0.26-0.48 of the image
        # guidance the sampler uses by default: best of a sweep (MODEL_CARD.md)
        text_scale=3.0,
        image_scale=3.0,
        grounding_hidden=64,
        vocab="toy",
        # docs/method.md §7: the ablations switch these off (bench/toy_ablations.py)
        location_control=True,
        box_coordinates=True,
        cls_feature=True,
        # beyond the paper: each subject's tokens attended only inside its region
        region_attention=True,
        attention="auto",  # kernel: TPU splash, GPU cuDNN, CPU XLA (sdjax.models.kernels)
    )
    c.task = "subject_diffusion"
    # image_encoder: the toy CLIP run (configs/toy_clip.py); empty = a random frozen tower.
    c.init = dict(pretrained="", image_encoder="")
    c.data = dict(
        path="",  # empty: WORKDIR/data
        toy_n=20000,
        toy_size=64,
        toy_seed=0,
        describe_prob=0.0,  # captions name shapes and background only: looks come from refs
        p_text=0.05,
        p_both=0.05,
        p_mask=0.05,
        region_box_prob=0.25,  # regions from boxes, as for a subject sampled without a mask
        hflip_prob=0.5,  # reference augmentation
        rotate_degrees=10.0,
        perspective=0.5,
        perspective_prob=0.5,
        shuffle=True,
        worker_count=0,
        read_threads=4,
        prefetch_buffer=64,
    )
    c.train = dict(
        num_steps=4000,  # about 2 hours on a 2-core CPU (JAX_NUM_CPU_DEVICES=2)
        batch_size=32,
        lr=1e-3,
        warmup_steps=200,
        schedule_steps=0,  # length of the decay; 0: num_steps
        decay="cosine",
        clip_norm=1.0,
        b1=0.9,  # AdamW
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        ema=True,
        # From scratch every part trains except the frozen image encoder.
        trainable=(r"^(unet|text_encoder|grounding|cls_mlp)/",),
        checkpoint_every=500,
        log_every=10,
        seed=0,
        preview_every=1000,
        preview_steps=25,
        max_to_keep=2,
        # TPU: XLA's windowed einsum for fsdp weights (sdjax.train.run.compiler_options)
        collective_matmul=False,
    )
    c.loss = dict(attn_weight=0.01, attn_form="balanced_l1", ema_decay=0.999)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = [("batch", ("data", "fsdp"))]
    return c
