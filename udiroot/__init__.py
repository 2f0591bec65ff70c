"""Shifter runtime core: udiRoot.conf, image selection, container assembly."""
