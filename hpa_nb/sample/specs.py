"""The two samples every command falls back to, by their generator settings (light: the command line reads
the defaults)."""

# The default sample: big enough for every class to show up and for a quick model to learn
# something, small enough to generate in seconds on 2 CPU cores.
DEFAULT_SAMPLE = {"images": 240, "size": 256, "seed": 0, "bit_depth": 8, "test_images": 16}
# Held-out images for comparing cell-level scorings: the default sample's 16 test images are too few
# (one image with a mitotic spindle, one spindle cell in it, moves the mAP by 0.04). These come from
# the same generator with another seed, so no model trained on the default sample has seen them.
EVALUATION_SAMPLE = {"images": 20, "size": 256, "seed": 1, "bit_depth": 8, "test_images": 400}
