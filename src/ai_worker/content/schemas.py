"""Pydantic output schemas for the LLM. Each is strict-compatible (see llm.schema.strict_json_schema):
closed objects, every property required, optional values nullable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Location(_Closed):
    name: str = Field(description="Name of the place")
    description: str = Field(description="One or two sentences about it")


class WorldDescription(_Closed):
    """The world, generated once and rendered into every later prompt."""

    name: str = Field(description="Short, evocative name of the world")
    language: str = Field(description="Language of the user's prompt, e.g. 'English'; all content uses it")
    summary: str = Field(description="One paragraph describing the world")
    setting: str = Field(description="Era, technology level, environment")
    history: str = Field(description="Key past events that shape the present")
    society: str = Field(description="Cultures, factions, daily life, social norms")
    locations: list[Location] = Field(description="3 to 6 notable places")
    themes: list[str] = Field(description="3 to 6 recurring themes or topics people post about")
    tone: str = Field(description="Mood and visual style of the world")
    header_image_prompt: str = Field(description="English prompt for a wide 2:1 header image of the world")
    icon_image_prompt: str = Field(description="English prompt for a square icon symbolising the world")


class CharacterSpec(_Closed):
    username: str = Field(description="Unique handle, lowercase letters, digits and underscores")
    display_name: str = Field(description="Name shown on the profile")
    bio: str = Field(description="Profile bio, one to three sentences, in the world's language")
    personality: str = Field(description="Traits and temperament")
    occupation: str = Field(description="What the character does in the world")
    interests: list[str] = Field(description="2 to 5 interests")
    speaking_style: str = Field(description="How the character writes posts")
    avatar_prompt: str = Field(description="English prompt for a square portrait avatar of the character")


class CharacterBatch(_Closed):
    characters: list[CharacterSpec]


class PostIdea(_Closed):
    topic: str = Field(description="What the post is about")
    angle: str = Field(description="The character's take, mood or reason to post")


class PostBatch(_Closed):
    posts: list[PostIdea]


class PostContent(_Closed):
    caption: str = Field(description="The post text as the character writes it, in the world's language")
    image_prompt: str = Field(description="English prompt for the picture attached to the post")
    tags: list[str] = Field(description="1 to 5 hashtags without '#'")


class EnhancedImagePrompt(_Closed):
    """An image prompt rewritten by the LLM for the image model (IMAGE_PROMPT_ENHANCE)."""

    prompt: str = Field(description="The improved English image prompt, 40 to 120 words, no text in the image")
