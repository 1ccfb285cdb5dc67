"""Inpainting: regenerate several regions of a clip and keep everything else.

python examples/inpaint.py --model ./sa3-medium song.wav "drum fill" --region 4 6 --region 12 13.5
"""

import argparse

import mlx_sa3

parser = argparse.ArgumentParser()
parser.add_argument("audio")
parser.add_argument("prompt")
parser.add_argument("--model", default="demo")
parser.add_argument(
    "--region",
    nargs=2,
    type=float,
    action="append",
    metavar=("START", "END"),
    required=True,
    help="seconds to regenerate; repeat for several regions",
)
parser.add_argument("-o", "--output", default="inpaint.wav")
args = parser.parse_args()

source = mlx_sa3.read_audio(args.audio)
pipe = mlx_sa3.StableAudio3.from_pretrained(args.model)
result = pipe.generate_to_file(
    args.output, args.prompt, duration=source.shape[1] / 44100, inpaint_audio=args.audio, inpaint_regions=args.region
)
print(f"wrote {result.paths[0]}: regions {args.region} regenerated")
