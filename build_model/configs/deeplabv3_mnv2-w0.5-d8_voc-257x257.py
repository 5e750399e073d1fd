# DeepLabV3 on MobileNetV2 (width 0.5, output stride 8), Pascal VOC 2012, 21 classes: the
# network of TensorFlow Lite's `deeplabv3_257_mv_gpu.tflite`, whose trained weights
# `python -m pspnet.build_model.tflite_convert` turned into
# build_model/trained/deeplabv3-mnv2-voc/deeplabv3_mnv2_voc.pth (provenance and licences
# there). Every fact below was read from the TFLite graph and is checked by the converter:
# channels 16/8/12/16/32/48/80/160 (TF's, not mmseg's rounding), ReLU6, the depthwise 3x3
# dilations block by block, BatchNorm folded into conv biases (so no norm layers here),
# a head of image pooling + one 1x1 branch -> 1x1 projection -> 1x1 classifier, and every
# resize bilinear with align_corners=True. Input: RGB, (x - 127.5) / 127.5, sides of
# 8k + 1 pixels (257), where TF's SAME padding equals the symmetric padding used here.
custom_imports = dict(imports=['pspnet.build_model.mobile_deeplab'], allow_failed_imports=False)
network_name = 'DeepLabV3 MobileNetV2-0.5 OS8 (TFLite, trained on VOC 2012)'
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='MobileNetV2PerBlock',
        widen_factor=0.5,                          # the stem: 16 channels
        stage_channels=(8, 12, 16, 32, 48, 80, 160),
        strides=(1, 2, 2, 1, 1, 1, 1),             # 257 -> 129 -> 65 -> 33
        dilations=(1, 1, 1, 1, 1, 1, 1),           # unused: block_dilations instead
        block_dilations=((1,), (1, 1), (1, 1, 1), (1, 2, 2, 2), (2, 2, 2), (2, 4, 4),
                         (4,)),
        out_indices=(1, 2, 4, 6),                  # as mmseg's MobileNetV2 configs
        norm_cfg=None,
        act_cfg=dict(type='ReLU6')),
    decode_head=dict(
        type='DeepLabV3MobileHead',
        in_channels=160,
        in_index=3,                                # stage 7's output
        channels=256,
        dilations=(1,),
        dropout_ratio=0.0,
        num_classes=21,
        norm_cfg=None,
        act_cfg=dict(type='ReLU'),
        align_corners=True,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
