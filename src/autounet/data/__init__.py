"""Raw datasets: layouts (MSD, nnU-Net v2), image I/O, validation and synthetic data.

Axis convention, used everywhere in autounet: image arrays are ``(C, Z, Y, X)`` (channels first,
then the reversed ITK index order), label arrays ``(Z, Y, X)``, and ``spacing`` is ``(z, y, x)`` in
millimetres in the same order as the array axes. Only ``origin_xyz`` and ``direction_xyz`` keep
ITK's world ``(x, y, z)`` order, because they describe physical space, not array axes.
"""
