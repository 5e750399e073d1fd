"""Product commands over a fixed set of images: `pspnet eval` (VOC mIoU through the
daemon's pipeline) and `pspnet batch` (the same stage functions on Ray Data), with their
VOC reading, progress lines and report pictures."""
