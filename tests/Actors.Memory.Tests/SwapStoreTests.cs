using ActorVmm.Memory;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>The swap store on a real temporary file: direct-mapped pages, holes, teardown.</summary>
public sealed class SwapStoreTests
{
    private const int Page = 4096;

    private static string TempPath() => Path.Combine(Path.GetTempPath(), $"actorvmm-swapstore-{Guid.NewGuid():N}");

    [Fact]
    public void A_run_written_at_a_page_reads_back_page_by_page_at_that_page_times_4_KiB()
    {
        var path = TempPath();
        using var store = new SwapStore(path);
        var run = new byte[3 * Page];
        for (var i = 0; i < run.Length; i++) run[i] = (byte)(i / Page + 1);
        store.Write(10, run);

        Assert.Equal(10 * 4096UL, SwapStore.Offset(10));
        Assert.Equal(13L * Page, new FileInfo(path).Length); // pages 0..9 are a hole, not written
        var page = new byte[Page];
        store.Read(11, page);
        Assert.All(page, b => Assert.Equal(2, b));
        store.Read(3, page); // a hole below the written run reads as zeros
        Assert.All(page, b => Assert.Equal(0, b));
    }

    [Fact]
    public void A_page_past_the_end_is_a_short_read_and_a_partial_page_is_refused()
    {
        using var store = new SwapStore(TempPath());
        store.Write(0, new byte[Page]);
        var e = Assert.Throws<VmspaceException>(() => store.Read(1, new byte[Page]));
        Assert.Contains("short read of page 1", e.Message);
        Assert.Throws<ArgumentException>(() => store.Write(2, new byte[Page / 2]));
    }

    [Fact]
    public void The_file_is_created_empty_and_deleted_on_dispose()
    {
        var path = TempPath();
        File.WriteAllBytes(path, new byte[2 * Page]); // a stale file of an earlier run: truncated
        var store = new SwapStore(path);
        Assert.Equal(0, new FileInfo(path).Length);
        store.Dispose();
        Assert.False(File.Exists(path));
    }
}
