"""URLs of the benchmark site: /items/ (a template over a sqlite query) and /hello/."""

from django.urls import path
from shop import views

urlpatterns = [
    path("items/", views.items),
    path("hello/", views.hello),
]
