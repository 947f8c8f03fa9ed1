"""`fgrpo.train` with a flow-matching anchor on rendered scenes (docs/geneval_investigation.md, "Its own
correct images, block-mean exploration, an anchor, and the rollout sampler"). Run from the repository root:

    python docs/probes/anchor_train.py 0.03 run.output_dir=runs/anchor

The first argument is the anchor's weight; the rest are config overrides (no `--set`). With every training
batch of the GRPO update, the denoiser also gets the gradient of that weight times the flow-matching loss
(`fgrpo.pretrain.flow_matching_loss`, as in pretraining) on a batch of the same size of
correct renderings of train prompts (task types uniform, fresh scenes every batch), so each optimizer step
mixes the policy gradient with a pull towards the data the model was pretrained on. At the shipped model
the flow-matching gradient over 512 rendered scenes has norm about 0.027 and the policy gradient over 512
images about 1e-3, so weights of 0.01-0.1 put the two within an order of magnitude of each other.
"""
import sys

import torch

import fgrpo.train as T
from fgrpo import config as C
from fgrpo.pretrain import flow_matching_loss, scene_stream
from fgrpo.tasks import shapes

if __name__ == "__main__":
    try:
        weight = float(sys.argv[1])
        cfg = C.load("configs/geneval.toml", sys.argv[2:])
    except (IndexError, ValueError, C.ConfigError) as e:
        sys.exit(f"{e}\nusage: python docs/probes/anchor_train.py WEIGHT [section.key=value ...]")
    streams = []  # made at the first batch, when the model's image size is known
    gen = torch.Generator().manual_seed(cfg.sample.seed + 17)
    grpo_batch = T.train_on_batch

    def train_on_batch(policy, traj, sl, steps, adv, cond, uncond, cfg, scale):
        stats = grpo_batch(policy, traj, sl, steps, adv, cond, uncond, cfg, scale)
        model = policy.model
        if not streams:
            streams.append(scene_stream(shapes.load_prompts("train"), cfg.sample.batch_size, model.image_size,
                                        cfg.sample.seed + 17))
        prompts, images = next(streams[0])
        loss = flow_matching_loss(model, model.encode_images(images.to(traj.states.device)), prompts, gen)
        (weight * loss / cfg.train.grad_accum).backward()
        return stats

    T.train_on_batch = train_on_batch
    T.train(cfg, progress=False, overwrite=True)
