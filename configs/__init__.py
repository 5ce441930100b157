"""The shipped configs (installed as ``oars_fast.configs``): ``demo/`` (CPU, tiny models) and
``qwen_image_edit/`` (production, 8 GPUs). Read them with :func:`oars_fast.config.shipped_config`."""
