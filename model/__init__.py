"""The model's data, as every layer reads it: the manifest of a model directory, image
decoding and letterbox, logits to labels, mask files, mIoU areas, the serving network."""
