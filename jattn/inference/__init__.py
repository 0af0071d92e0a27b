"""A finished run put to use: restored, predicting images, scored on another set, its attention
maps."""
