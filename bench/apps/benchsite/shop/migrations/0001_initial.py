"""The Item table and 200 rows in it."""

from django.db import migrations, models


def fill(apps, schema_editor):
    Item = apps.get_model("shop", "Item")
    Item.objects.bulk_create(
        Item(name=f"item {n:03d}", price=n * 1.25, stock=n % 7) for n in range(200)
    )


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Item",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100)),
                ("price", models.DecimalField(decimal_places=2, max_digits=8)),
                ("stock", models.IntegerField()),
            ],
        ),
        migrations.RunPython(fill),
    ]
