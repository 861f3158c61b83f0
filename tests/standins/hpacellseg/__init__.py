"""A stand-in for HPA-Cell-Segmentation 0.1.8 (hpacellseg) in the tests: the same module names, classes and
call signatures, written for these tests (none of the package's code). It keeps what hpa_nb must work
around: whole-module weight files read with torch.load's defaults, skimage's removed
``rescale(multichannel=)``, numpy's removed ``np.bool``, a resize back to the transposed shape, and
pixel-area thresholds tuned for 2048 px images."""
