using System.Text.Json.Nodes;
using ActorVmm.Host.Snapshot;

namespace ActorVmm.Host.Tests;

/// <summary>The snapshot directory on disk: what it writes, and every way a bad one is refused.</summary>
public sealed class SnapshotDirectoryTests : IDisposable
{
    private readonly TempDir _temp = new();

    public void Dispose() => _temp.Dispose();

    private string Dir => _temp.File("snap");

    /// <summary>A snapshot with a JSON part (a device's state record), a byte part and a sparse memory part.</summary>
    private SnapshotManifest WriteSample()
    {
        var writer = SnapshotDirectory.Create(Dir, "vm1");
        writer.WriteJson("uart", new UartState(Ier: 0x0F, Lcr: 0x03, Mcr: 0x08, Scratch: 0x5A, DivisorLatch: 12));
        writer.WriteBytes("vcpu-0", [1, 2, 3, 4, 5]);
        writer.WriteFile("memory", path =>
        {
            using var file = File.Create(path);
            file.SetLength(1 << 20); // sparse: a hole but for one page
            file.Position = 4096;
            file.Write(new byte[4096].Select((_, i) => (byte)i).ToArray());
        });
        return writer.Complete();
    }

    /// <summary>A stand-in state record: the shape the device models' records have.</summary>
    private sealed record UartState(byte Ier, byte Lcr, byte Mcr, byte Scratch, ushort DivisorLatch);

    [Fact]
    public void A_written_snapshot_reads_back_part_by_part()
    {
        var written = WriteSample();

        var snapshot = SnapshotDirectory.Open(Dir);

        Assert.Equal("vm1", snapshot.Manifest.VmName);
        Assert.Equal(SnapshotManifest.CurrentVersion, snapshot.Manifest.Version);
        Assert.Equal(written.Parts, snapshot.Manifest.Parts);
        Assert.Equal(new UartState(0x0F, 0x03, 0x08, 0x5A, 12), snapshot.ReadJson<UartState>("uart"));
        Assert.Equal([1, 2, 3, 4, 5], snapshot.ReadBytes("vcpu-0"));
        Assert.Null(snapshot.Manifest.Parts.Single(p => p.Name == "memory").Sha256); // checked by length: read lazily
        Assert.Equal(1 << 20, new FileInfo(snapshot.PathOf("memory")).Length);
        Assert.False(snapshot.Has("vcpu-1"));
        Assert.Contains("no part \"vcpu-1\"", Assert.Throws<SnapshotException>(() => snapshot.PathOf("vcpu-1")).Message);
    }

    [Fact]
    public void A_directory_whose_writing_was_cut_short_is_no_snapshot()
    {
        var writer = SnapshotDirectory.Create(Dir, "vm1");
        writer.WriteBytes("vcpu-0", [1]);

        Assert.Contains("has no manifest.json", Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir)).Message);
    }

    [Fact]
    public void A_snapshot_is_never_written_over_something_else()
    {
        WriteSample();

        Assert.Contains("is not empty", Assert.Throws<SnapshotException>(() => SnapshotDirectory.Create(Dir, "vm1")).Message);
        Assert.Contains("is a file", Assert.Throws<SnapshotException>(() => SnapshotDirectory.Create(_temp.Write("f", "x"), "vm1")).Message);
    }

    [Fact]
    public void A_truncated_part_is_refused_by_name()
    {
        WriteSample();
        using (var file = File.OpenWrite(Path.Combine(Dir, "memory.part"))) file.SetLength(4096);

        var e = Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir));

        Assert.Contains("part \"memory\"", e.Message);
        Assert.Contains("truncated", e.Message);
    }

    [Fact]
    public void A_changed_part_is_refused_by_its_hash()
    {
        WriteSample();
        File.WriteAllBytes(Path.Combine(Dir, "vcpu-0.part"), [1, 2, 3, 4, 6]);

        var e = Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir));

        Assert.Contains("part \"vcpu-0\"", e.Message);
        Assert.Contains("SHA-256", e.Message);
    }

    [Fact]
    public void A_missing_part_is_refused_by_name()
    {
        WriteSample();
        File.Delete(Path.Combine(Dir, "uart.part"));

        Assert.Contains("part \"uart\" is missing", Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir)).Message);
    }

    [Theory]
    [InlineData("version", 2, "format version 2")]
    [InlineData("version", 0, "format version 0")]
    [InlineData("format", "qemu-savevm", "not an ActorVmm snapshot")]
    public void Another_version_or_a_foreign_format_is_refused(string field, object value, string expected)
    {
        WriteSample();
        EditManifest(m => m[field] = JsonValue.Create(value));

        Assert.Contains(expected, Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir)).Message);
    }

    [Theory]
    [InlineData("../outside.part")]
    [InlineData("/etc/passwd")]
    [InlineData("manifest.json")]
    public void A_part_named_outside_the_directory_is_refused(string file)
    {
        WriteSample();
        EditManifest(m => m["parts"]![0]!["file"] = file);

        Assert.Contains("not a file of the snapshot directory", Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir)).Message);
    }

    [Fact]
    public void A_manifest_that_is_not_json_or_lists_a_part_twice_is_refused()
    {
        WriteSample();
        var manifest = Path.Combine(Dir, SnapshotDirectory.ManifestFile);
        var good = File.ReadAllText(manifest);

        File.WriteAllText(manifest, good[..(good.Length / 2)]);
        Assert.Contains("is not a snapshot manifest", Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir)).Message);

        File.WriteAllText(manifest, good);
        EditManifest(m => m["parts"]!.AsArray().Add(m["parts"]![0]!.DeepClone()));
        Assert.Contains("lists a part twice", Assert.Throws<SnapshotException>(() => SnapshotDirectory.Open(Dir)).Message);
    }

    [Fact]
    public void A_part_name_that_is_no_plain_file_name_is_refused_when_written()
    {
        var writer = SnapshotDirectory.Create(Dir, "vm1");

        Assert.Throws<ArgumentException>(() => writer.WriteBytes("../x", [1]));
        Assert.Throws<ArgumentException>(() => writer.WriteBytes("", [1]));
        writer.WriteBytes("vcpu-0", [1]);
        Assert.Throws<ArgumentException>(() => writer.WriteBytes("vcpu-0", [2]));
    }

    private void EditManifest(Action<JsonNode> edit)
    {
        var path = Path.Combine(Dir, SnapshotDirectory.ManifestFile);
        var node = JsonNode.Parse(File.ReadAllText(path))!;
        edit(node);
        File.WriteAllText(path, node.ToJsonString());
    }
}
