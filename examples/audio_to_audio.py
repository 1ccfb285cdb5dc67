"""Audio to audio: restyle a clip. A low noise level stays close to it, a high one moves far away.

python examples/audio_to_audio.py --model ./sa3-small-music in.wav "jazz trio" --noise-level 0.6
"""

import argparse

import mlx_sa3

parser = argparse.ArgumentParser()
parser.add_argument("audio", help="any file libsndfile reads; resampled to 44.1 kHz")
parser.add_argument("prompt")
parser.add_argument("--model", default="demo")
parser.add_argument("--noise-level", type=float, default=0.7, help="(0, 1]: 0.1 close variation, 0.9 loose")
parser.add_argument("-o", "--output", default="audio_to_audio.wav")
args = parser.parse_args()

source = mlx_sa3.read_audio(args.audio)  # (2, N) float32 at 44.1 kHz
pipe = mlx_sa3.StableAudio3.from_pretrained(args.model)
result = pipe.generate_to_file(
    args.output,
    args.prompt,
    duration=source.shape[1] / 44100,
    init_audio=(source, 44100),
    init_noise_level=args.noise_level,
)
print(f"wrote {result.paths[0]} (seed {result.seed})")
