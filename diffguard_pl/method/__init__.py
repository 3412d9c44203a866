"""The method: DDIM steps and ladders (ddim), the walk of inversion and synthesis (walk), classifier and
classifier-free guidance (guidance), Grad-CAM for DSG (cam), the adaptive early stop (aes), the distances
(scores), oracle labels (oracle), execution settings (runtime), and the pipeline that runs them (pipeline).
Pure tensor code: nothing here reads data files or knows about Lightning."""
