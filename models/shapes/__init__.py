"""The project's own tiny text-to-video model: coloured shapes that move as the caption says.

No weights can be downloaded here, and random weights render noise, which shows nothing
about whether the service keeps quality. So the CPU default is a real (if tiny) Wan
model trained by `python -m models.shapes.train` on a synthetic captioned data set
(`data.py`: "a red circle moving left"), and `scorer.py` checks from the decoded frames
alone whether a video follows its prompt (colour, shape, direction).
"""
