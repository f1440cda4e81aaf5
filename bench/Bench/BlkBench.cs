using System.Globalization;

namespace ActorVmm.Bench;

/// <summary>
/// Virtio-blk throughput from inside a Linux guest, under ActorVmm and under QEMU on the same kind of
/// file in the same place and run: the guest kit's kernel and initramfs with <c>actorvmm.init=blkbench</c>,
/// whose init makes O_DIRECT transfers over the first 64 MiB of /dev/vda (busybox dd): a 1 MiB-block
/// write with a final fsync, a 1 MiB-block read, and sequential 4 KiB reads (one request each: IOPS);
/// then the kit's <c>actorvmm-randread</c> (4096 reads of 4 KiB at random offsets, the same ones for
/// every VMM). Each is timed by this process's clock between the lines the guest prints before and
/// after it (console latency included, the same for both VMMs). Each VMM
/// gets a fresh 128 MiB disk file in the temporary folder. QEMU boots with <c>-M microvm,pcie=on</c> (its PCIe host bridge;
/// under <c>-M pc</c> its guest's timer stalls in the KVM box: the HPET's clockevent, or without it
/// the reads) and a virtio-blk-pci disk (its default cache mode, writeback: a FLUSH is an fsync, as
/// ActorVmm's).
/// </summary>
internal static class BlkBench
{
    private const string Memory = "256M";
    private const long DiskBytes = 128L << 20;
    private static readonly TimeSpan Limit = TimeSpan.FromMinutes(10);
    private static readonly string[] Transfers = ["write-1m", "read-1m", "read-4k", "read-4k-random"];

    private sealed record Vmm(string Name, string FileName, Func<string, string[]> Arguments);

    public static async Task<int> RunAsync(int runs)
    {
        if (LinuxBootBench.Prerequisites("blk") is not var (host, kernel, initrd)) return 2;
        // QEMU's guest gets noapictimer in the KVM box, as in the linuxboot bench (KVM's APIC timer stalls there).
        var box = Environment.GetEnvironmentVariable("ACTORVMM_KVM_BOX") == "1";
        const string append = "console=ttyS0 panic=-1 actorvmm.init=blkbench";
        var vmms = new List<Vmm>
        {
            new("actorvmm", host, disk => ["run", "--kernel", kernel, "--initrd", initrd, "--append", append, "--memory", Memory, "--disk", disk]),
        };
        if (StartupBench.OnPath("qemu-system-x86_64") is not { } qemu)
            Console.WriteLine("blk: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86): ActorVmm alone");
        else
            vmms.Add(new("qemu microvm", qemu, disk =>
            [
                "-accel", "kvm", "-cpu", "host", "-M", "microvm,pcie=on", "-m", Memory, "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", box ? append + " noapictimer" : append,
                "-drive", $"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0",
            ]));

        // The disk files live in the temporary folder of the machine the VMMs run on (in the KVM box, its
        // own /tmp, not the host's folders it reaches over 9p, whose latency would be the measure).
        var dir = Directory.CreateDirectory(Path.Combine(Path.GetTempPath(), $"actorvmm-blk-{Environment.ProcessId}"));
        try
        {
            var results = vmms.ToDictionary(v => v, _ => Transfers.ToDictionary(t => t, _ => new List<double>()));
            for (var i = 0; i < runs; i++)
                foreach (var vmm in vmms)
                {
                    var disk = Path.Combine(dir.FullName, "disk.img");
                    await using (var f = File.Create(disk)) f.SetLength(DiskBytes);
                    foreach (var (name, mbps) in await RunOnce(vmm, disk))
                    {
                        results[vmm][name].Add(mbps);
                        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  run {i + 1} {vmm.Name}: {name} {mbps:F1} MB/s"));
                    }
                    File.Delete(disk);
                }

            Console.WriteLine($"virtio-blk from inside Linux (guest kit, {Memory}, 1 vcpu), O_DIRECT over 64 MiB of a 128 MiB file, KVM{(box ? " (in the KVM box)" : "")}; median of {runs} run(s)");
            Console.WriteLine($"{"",-14}{"write 1M MB/s",15}{"read 1M MB/s",15}{"read 4K IOPS",15}{"random 4K IOPS",16}");
            double? M(Vmm vmm, string t) => results[vmm][t].Count > 0 ? StartupBench.Median(results[vmm][t]) : null;
            string Cell(double? v, string format) => v is { } x ? x.ToString(format, CultureInfo.InvariantCulture) : "-";
            foreach (var vmm in vmms)
                Console.WriteLine($"{vmm.Name,-14}{Cell(M(vmm, "write-1m"), "F1"),15}{Cell(M(vmm, "read-1m"), "F1"),15}{Cell(M(vmm, "read-4k") * 1e6 / 4096, "F0"),15}{Cell(M(vmm, "read-4k-random") * 1e6 / 4096, "F0"),16}");
            if (vmms.Count > 1)
                foreach (var t in Transfers)
                    Console.WriteLine($"actorvmm / qemu, {t}: {Cell(M(vmms[0], t) / M(vmms[1], t), "F2")}   goal: >= 0.8");
            return 0;
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    /// <summary>Boots <paramref name="vmm"/> on <paramref name="disk"/> and answers each transfer's MB/s, timed
    /// by the host's clock from its start line to its result line (the guest's own clock is printed beside:
    /// a guest whose timer stalls, as QEMU's in the KVM box can, keeps time badly).</summary>
    private static async Task<List<(string Name, double MBps)>> RunOnce(Vmm vmm, string disk)
    {
        var found = new List<(string, double)>();
        var starts = new Dictionary<string, double>();
        var guest = await LinuxBootBench.GuestConsoleLines(vmm.FileName, vmm.Arguments(disk), Limit, (line, ms) =>
        {
            var parts = line.Trim().Split(' ');
            if (parts is ["ACTORVMM-BLK-START", var started]) starts[started] = ms;
            if (parts is ["ACTORVMM-BLK", var name, var bytesText, var secondsText] &&
                starts.TryGetValue(name, out var from) &&
                long.TryParse(bytesText, CultureInfo.InvariantCulture, out var bytes) &&
                double.TryParse(secondsText, CultureInfo.InvariantCulture, out var guestSeconds))
            {
                var seconds = (ms - from) / 1000;
                found.Add((name, bytes / seconds / 1e6));
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  {vmm.Name}: {name} {bytes} bytes in {seconds:F2} s (host clock), {guestSeconds:F2} s (guest clock)"));
            }
            return line.StartsWith("ACTORVMM-INIT-DONE", StringComparison.Ordinal);
        });
        if (found.Count == 0)
            throw new InvalidOperationException($"{vmm.Name}: no transfer reported within {Limit} ({guest.Ending})");
        if (found.Count < Transfers.Length)
            Console.WriteLine($"  {vmm.Name}: {found.Count} of {Transfers.Length} transfers reported within {Limit} ({guest.Ending})");
        return found;
    }
}
