"""Running `autounet run` and `autounet predict` on a Ray cluster (``--executor ray``).

Ray is optional (``pip install autounet[ray]``) and imported only inside the functions that
need it. ``session`` starts or joins Ray; ``shared_fs`` makes sure every node sees the
workspace; ``ray_run`` trains every configuration x fold as a Ray task; ``ray_predict`` shards
the cases of a prediction over workers; ``progress`` reports what the tasks do.
"""
