"""BrainG3N 3D masked-autoencoder pretraining and encoding -> tokens shards."""
