namespace ActorVmm.LibVmm.Tests;

/// <summary><see cref="SparseFiles"/> on real files in the temp directory (and a memfd: the
/// copy_file_range fallback across file systems).</summary>
public sealed class SparseFilesTests : IDisposable
{
    private const int Page = 4096;
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-sparse-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static byte[] Pattern(int length, byte seed) => Enumerable.Range(0, length).Select(i => (byte)(seed + i * 31)).ToArray();

    [Fact]
    public void DataRanges_must_list_the_written_extents_clipped_to_the_range()
    {
        var path = Path.Combine(_dir, "f");
        using var f = File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite);
        RandomAccess.SetLength(f, 64 * Page);
        RandomAccess.Write(f, Pattern(2 * Page, 1), 4 * Page);
        RandomAccess.Write(f, Pattern(Page, 2), 40 * Page);

        Assert.Equal([(4UL * Page, 2UL * Page), (40UL * Page, (ulong)Page)], SparseFiles.DataRanges(f, 0, 64 * Page));
        Assert.Equal([(5UL * Page, (ulong)Page)], SparseFiles.DataRanges(f, 5 * Page, 10 * Page));
        Assert.Empty(SparseFiles.DataRanges(f, 41 * Page, 23 * Page));
    }

    [Fact]
    public void Copy_must_copy_the_bytes_between_files_and_from_a_memfd_on_another_file_system()
    {
        var from = Path.Combine(_dir, "from");
        var to = Path.Combine(_dir, "to");
        var data = Pattern(3 * Page + 100, 7);
        File.WriteAllBytes(from, data);
        using (var src = File.OpenHandle(from))
        using (var dst = File.OpenHandle(to, FileMode.Create, FileAccess.ReadWrite))
        {
            RandomAccess.SetLength(dst, 16 * Page);
            SparseFiles.Copy(src, Page, dst, 8 * Page, 2 * Page + 100);
            Assert.Throws<IOException>(() => SparseFiles.Copy(src, 3 * Page, dst, 14 * Page, Page)); // past the source's end
        }
        var copied = File.ReadAllBytes(to);
        Assert.Equal(16 * Page, copied.Length);
        Assert.Equal(data[Page..], copied[(8 * Page)..(10 * Page + 100)]);
        Assert.All(copied[..(8 * Page)], b => Assert.Equal(0, b));

        // memfd (the kernel's internal tmpfs) to a file elsewhere: EXDEV, so pread/pwrite.
        using var region = new MemfdRegion("sparse-test", 4 * Page);
        Pattern(Page, 9).CopyTo(region.HostSpan(Page, Page));
        using (var memfd = new Microsoft.Win32.SafeHandles.SafeFileHandle(region.Fd, ownsHandle: false))
        using (var dst = File.OpenHandle(to, FileMode.Open, FileAccess.ReadWrite))
            SparseFiles.Copy(memfd, Page, dst, 0, Page);
        Assert.Equal(Pattern(Page, 9), File.ReadAllBytes(to)[..Page]);
    }
}
