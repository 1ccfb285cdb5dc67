"""How an app uses mlx_sa3: load once, generate many times with progress, cancellation and streamed audio.

python examples/app_streaming.py --model ./sa3-small-music
"""

import argparse
import time

import mlx_sa3
from mlx_sa3.pipeline import AudioEvent, DoneEvent, StepEvent

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="demo")
parser.add_argument("--cancel-after", type=float, default=None, help="cancel a generation after this many seconds")
args = parser.parse_args()

pipe = mlx_sa3.StableAudio3.from_pretrained(args.model)  # once, at app start

for prompt in ["rain on a tin roof", "city ambience at night"]:
    started = time.monotonic()

    def keep_going(event):  # an app would check its Cancel button here
        return args.cancel_after is None or time.monotonic() - started < args.cancel_after

    received = []
    try:
        for event in pipe.stream(prompt, duration=8.0, callback=keep_going):
            if isinstance(event, StepEvent):
                print(f"{prompt!r}: step {event.index + 1}/{event.total}")
            elif isinstance(event, AudioEvent):  # hand each piece to the audio engine as soon as it exists
                received.append(event.audio)
                print(f"{prompt!r}: audio {event.offset + event.audio.shape[-1]}/{event.total} samples")
            elif isinstance(event, DoneEvent):
                print(f"{prompt!r}: done, seed {event.seed}, {event.timings}")
    except mlx_sa3.GenerationCancelled:
        print(f"{prompt!r}: cancelled")
        continue
    audio = np.concatenate(received, axis=-1)
    print(f"{prompt!r}: {audio.shape[-1] / pipe.sample_rate:.2f} s of audio")
