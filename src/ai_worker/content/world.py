"""Rendering the world description to text: the one function every later prompt uses."""

from __future__ import annotations

from ai_worker.content.schemas import CharacterSpec, WorldDescription


def render_world(world: WorldDescription) -> str:
    locations = "\n".join(f"- {loc.name}: {loc.description}" for loc in world.locations)
    themes = ", ".join(world.themes)
    return (
        f"World: {world.name}\n"
        f"Language: {world.language}\n"
        f"Summary: {world.summary}\n"
        f"Setting: {world.setting}\n"
        f"History: {world.history}\n"
        f"Society: {world.society}\n"
        f"Places:\n{locations}\n"
        f"Themes: {themes}\n"
        f"Tone: {world.tone}"
    )


def render_character(character: CharacterSpec) -> str:
    return (
        f"{character.display_name} (@{character.username}), {character.occupation}\n"
        f"Bio: {character.bio}\n"
        f"Personality: {character.personality}\n"
        f"Interests: {', '.join(character.interests)}\n"
        f"Writing style: {character.speaking_style}"
    )


def image_style(world: WorldDescription) -> str:
    return f"Style and mood: {world.tone}. No text, no watermarks."
