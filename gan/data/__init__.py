"""Image sources for the input pipeline: synthetic_faces, anime_faces (TFDS) and image_folder.

Submodules are imported on their own: synthetic_faces and image_folder need only numpy and PIL,
anime_faces needs TensorFlow Datasets.
"""
