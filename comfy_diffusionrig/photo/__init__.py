"""Photos in and out: loading, face detection and landmarks, FFHQ alignment, paste back, identity."""
