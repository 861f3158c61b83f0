"""Stand-in U-Net: a fixed 1×1 convolution, so its prediction follows the input's geometry.

Output channels are (background, border, inside); "inside" rises with the input channel `source`. Like
the fork's U-Nets, it declares its input and output channels (`input_channel_num`, `target_channel_num`).
"""

import torch


class PixelUnet(torch.nn.Module):
    def __init__(self, source: int, input_channel_num: int = 3):
        super().__init__()
        self.input_channel_num, self.target_channel_num = input_channel_num, 3
        self.conv = torch.nn.Conv2d(input_channel_num, 3, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([2.0, -4.0, -2.0]))
            self.conv.weight[2, source] = 8.0  # inside: bright pixels of the source channel
            self.conv.weight[0, source] = -4.0

    def forward(self, x):
        return self.conv(x)
