"""Text to audio with duration control.

python examples/text_to_audio.py --model ./sa3-small-music "lo-fi hip hop beat, 90 bpm" --duration 30
"""

import argparse

import mlx_sa3

parser = argparse.ArgumentParser()
parser.add_argument("prompt")
parser.add_argument("--model", default="demo", help="converted dir, original dir, repo id, or demo")
parser.add_argument("--duration", type=float, default=10.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("-o", "--output", default="text_to_audio.wav")
args = parser.parse_args()

pipe = mlx_sa3.StableAudio3.from_pretrained(args.model)
out = pipe.generate(args.prompt, duration=args.duration, seed=args.seed)
mlx_sa3.write_audio(args.output, out.audio[0], out.sample_rate)
print(f"{args.output}: {out.audio.shape[-1] / out.sample_rate:.2f} s, seed {out.seed}, {out.timings}")
