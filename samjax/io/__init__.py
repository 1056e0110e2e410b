"""Reading and writing files: checkpoints, the .pth reader, pretrained downloads."""
