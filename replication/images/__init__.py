"""The image tier: small real images, a learned UNet teacher, reflow / PeRFlow +- MA students."""
