using System.Diagnostics;
using System.Globalization;
using ActorVmm.Devices.Virtio;
using ActorVmm.LibVmm;

namespace ActorVmm.Bench;

/// <summary>
/// The host's share of a virtio-blk request, measurable without /dev/kvm: a driver's split virtqueue
/// built in real guest memory (a <see cref="GuestMemoryMap"/> over a memfd, as a VM's), requests laid
/// out as Linux lays them out (a 16-byte header, one descriptor per 4 KiB page of data, scattered
/// pages, a status byte), and <see cref="VirtioBlk.Process"/> over a <see cref="FileBlockBackend"/> on
/// a file in the temporary folder, the request made available and completed one at a time. The raw
/// loop moves the same bytes between the same file and the same guest pages with one preadv/pwritev
/// per request over iovecs built once: the least any VMM can do. Ratio = model / raw.
/// </summary>
internal static class BlkPathBench
{
    private const int Page = 4096;
    private const ushort QueueSize = 256;
    private const ulong Desc = 0x1_0000, Avail = 0x2_0000, Used = 0x3_0000, Header = 0x4_0000, Status = 0x4_1000;
    private const ulong Data = 0x100_0000; // the data pages: every other page from 16 MiB
    private const ulong RamBytes = 64UL << 20;
    private const long FileBytes = 32L << 20;

    public static int Run(int requests, int reps)
    {
        var path = Path.Combine(Path.GetTempPath(), $"actorvmm-blkpath-{Environment.ProcessId}.img");
        try
        {
            using (var f = File.Create(path))
            {
                var chunk = new byte[1 << 20];
                Random.Shared.NextBytes(chunk);
                for (var at = 0L; at < FileBytes; at += chunk.Length) f.Write(chunk);
            }
            using var memory = new GuestMemoryMap();
            memory.Add("ram", new GuestPhysAddr(0), RamBytes, new MemfdRegion("blkpath-ram", RamBytes));
            using var backend = FileBlockBackend.Open(path, readOnly: false);

            Console.WriteLine($"virtio-blk request, the host's share (no KVM: the queue driven in place of a guest): {requests} requests, best of {reps}");
            Console.WriteLine($"{"",-14}{"raw µs",10}{"model µs",10}{"ratio",8}");
            foreach (var (name, pages, write) in new[] { ("read 4K", 1, false), ("read 512K", 128, false), ("write 512K", 128, true) })
            {
                double raw = double.MaxValue, model = double.MaxValue;
                for (var i = 0; i < reps; i++)
                {
                    raw = Math.Min(raw, Raw(memory, backend, requests, pages, write));
                    model = Math.Min(model, Model(memory, backend, requests, pages, write));
                }
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{name,-14}{raw,10:F2}{model,10:F2}{model / raw,8:F2}"));
            }
            Console.WriteLine("(µs per request of the host's work; a guest adds its notify exit and its interrupt)");
            return 0;
        }
        finally
        {
            File.Delete(path);
        }
    }

    /// <summary>The sector of request <paramref name="i"/>: consecutive requests, wrapping within the file.</summary>
    private static long Offset(int i, int pages) => (long)i * pages * Page % (FileBytes - (long)pages * Page + 1) / Page * Page;

    private static ulong DataPage(int j) => Data + (ulong)j * 2 * Page;

    private static double Raw(GuestMemoryMap memory, FileBlockBackend backend, int requests, int pages, bool write)
    {
        var views = Enumerable.Range(0, pages).Select(j => memory.HostMemory(new GuestPhysAddr(DataPage(j)), Page)).ToArray();
        var readOnly = views.Select(v => (ReadOnlyMemory<byte>)v).ToArray();
        var clock = Stopwatch.StartNew();
        for (var i = 0; i < requests; i++)
        {
            if (write) backend.Write(Offset(i, pages), readOnly);
            else if (backend.Read(Offset(i, pages), views) != (long)pages * Page) throw new InvalidOperationException("short read");
        }
        return clock.Elapsed.TotalMicroseconds / requests;
    }

    private static double Model(GuestMemoryMap memory, FileBlockBackend backend, int requests, int pages, bool write)
    {
        Zero(memory, Desc, 0x3_0000); // descriptor table, available and used rings
        var blk = new VirtioBlk(memory, backend, "blkpath", () => VirtioFeatures.Version1 | VirtioBlkFeatures.Flush);
        var queue = SplitVirtqueue.Enable(new GuestRam(memory), QueueSize, new GuestPhysAddr(Desc), new GuestPhysAddr(Avail),
            new GuestPhysAddr(Used), VirtioFeatures.Version1);
        var data = write ? (ushort)0 : VirtqFlags.DescWrite;
        SetDesc(memory, 0, Header, 16, VirtqFlags.DescNext, 1);
        for (var j = 0; j < pages; j++) SetDesc(memory, j + 1, DataPage(j), Page, (ushort)(data | VirtqFlags.DescNext), (ushort)(j + 2));
        SetDesc(memory, pages + 1, Status, 1, VirtqFlags.DescWrite, 0);
        Span<byte> header = stackalloc byte[16];
        var clock = Stopwatch.StartNew();
        for (var i = 0; i < requests; i++)
        {
            BitConverter.TryWriteBytes(header, write ? VirtioBlkRequest.Out : VirtioBlkRequest.In);
            BitConverter.TryWriteBytes(header[8..], (ulong)Offset(i, pages) / VirtioBlkRequest.SectorSize);
            memory.Write(new GuestPhysAddr(Header), header);
            memory.WriteUInt16(Avail + 4 + 2UL * (ulong)(i % QueueSize), 0);
            memory.WriteUInt16(Avail + 2, (ushort)(i + 1));
            blk.Process(0, queue);
            if (memory.ReadUInt16(Used + 2) != (ushort)(i + 1) || memory.ReadByte(Status) != VirtioBlkRequest.StatusOk)
                throw new InvalidOperationException($"request {i} did not complete: {queue.Error}");
        }
        return clock.Elapsed.TotalMicroseconds / requests;
    }

    private static void SetDesc(GuestMemoryMap memory, int index, ulong address, uint length, ushort flags, ushort next)
    {
        var d = Desc + 16UL * (ulong)index;
        memory.WriteUInt64(new GuestPhysAddr(d), address);
        Span<byte> rest = stackalloc byte[8];
        BitConverter.TryWriteBytes(rest, length);
        BitConverter.TryWriteBytes(rest[4..], flags);
        BitConverter.TryWriteBytes(rest[6..], next);
        memory.Write(new GuestPhysAddr(d + 8), rest);
    }

    private static void Zero(GuestMemoryMap memory, ulong at, int length) => memory.Write(new GuestPhysAddr(at), new byte[length]);

    private static void WriteUInt16(this GuestMemoryMap memory, ulong at, ushort value)
    {
        Span<byte> b = stackalloc byte[2];
        BitConverter.TryWriteBytes(b, value);
        memory.Write(new GuestPhysAddr(at), b);
    }

    private static ushort ReadUInt16(this GuestMemoryMap memory, ulong at)
    {
        Span<byte> b = stackalloc byte[2];
        memory.Read(new GuestPhysAddr(at), b);
        return BitConverter.ToUInt16(b);
    }

    private static byte ReadByte(this GuestMemoryMap memory, ulong at)
    {
        Span<byte> b = stackalloc byte[1];
        memory.Read(new GuestPhysAddr(at), b);
        return b[0];
    }
}
