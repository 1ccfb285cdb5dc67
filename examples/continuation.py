"""Continuation: extend a clip past its end (inpainting audio with no regions = generate after the clip).

python examples/continuation.py --model ./sa3-small-music intro.wav "ambient drone" --duration 60
"""

import argparse

import mlx_sa3

parser = argparse.ArgumentParser()
parser.add_argument("audio")
parser.add_argument("prompt")
parser.add_argument("--model", default="demo")
parser.add_argument("--duration", type=float, required=True, help="total length, longer than the clip")
parser.add_argument("-o", "--output", default="continuation.wav")
args = parser.parse_args()

pipe = mlx_sa3.StableAudio3.from_pretrained(args.model)
result = pipe.generate_to_file(args.output, args.prompt, duration=args.duration, inpaint_audio=args.audio)
print(f"wrote {result.paths[0]} ({args.duration:g} s)")
