"""Stage 3, data: images and labels in, tf.data out. The competition's layouts (`competition`), the shared decoder
(`reading`, with bad input named in `bad_input`), the two record artifacts and their one commit protocol
(`records`: `shards` of whole images, `tiles` of cells cut with `crops`), the split (`splits`), augmentation
(`augment`) and the training and evaluation streams (`pipeline`).

May import: core, segmentation.
"""
