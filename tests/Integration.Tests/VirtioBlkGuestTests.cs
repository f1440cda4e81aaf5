using System.Buffers.Binary;
using System.Text;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Virtio;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Real guests drive the virtio block device (<c>--disk FILE[,ro]</c>, PCI 00:02.0) over a real file, as a
/// driver does (<see cref="VirtioDriverCode"/>: PCI scan, BAR, capabilities, MSI-X, virtio 1.2 §3.1.1
/// initialisation). One notification carries four requests (§5.2.6): OUT of a pattern to sector 1,
/// FLUSH, IN of sector 2 (which the test wrote into the file beforehand), GET_ID. The test then checks
/// the FILE (sector 1 holds the guest's pattern, nothing else changed), the guest's read buffer, the
/// status bytes and the used ring. The virtio console (<c>--virtio-console</c>, 00:03.0) is driven the
/// same way: transmitted bytes appear on the VM's console, host input reaches a posted receive buffer.
/// </summary>
public sealed class VirtioBlkGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Desc = 0x20_0000;
    private const ulong Avail = 0x20_1000;
    private const ulong Used = 0x20_2000;
    private const ulong Headers = 0x20_3000;   // request i's header at + 16 i
    private const ulong WriteData = 0x20_4000; // 512 bytes: the guest's pattern
    private const ulong ReadData = 0x20_5000;  // 512 bytes, filled with 0xEE before the IN
    private const ulong Statuses = 0x20_6000;  // request i's status byte at + i, 0xFF before
    private const ulong IdData = 0x20_7000;    // the 20 bytes of GET_ID
    private const ulong ReadBack = 0x20_8000;  // 512 bytes: sector 1 read after the device's restart
    private const ushort QueueSize = 32;

    private const ulong VectorSeen = 0x9F904;  // dword: the vector of the last handler that ran
    private const ulong FeaturesSeen = 0x9F908; // dword: the device's feature bits 0-31
    private const ulong StatusSeen = 0x9F90C;  // byte: device_status at the end
    private const byte QueueVector = 0x51;
    private const byte ConfigVector = 0x52;
    private const ulong BarBase = Platform.PciMmioWindowBase;
    private const ulong OutsideRam = 0x8000_0000;

    private const int Sectors = 4;
    private const int Sector = 512;

    /// <summary>What the guest writes to sector 1: dword i = i × 0x01010101 XOR 0xA5C35A3C.</summary>
    private static byte[] GuestPattern()
    {
        var bytes = new byte[Sector];
        for (var i = 0; i < Sector / 4; i++)
            BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(4 * i), (uint)i * 0x01010101u ^ 0xA5C3_5A3Cu);
        return bytes;
    }

    /// <summary>The file before the run: sector s byte j = s × 0x40 + j × 7 (mod 256).</summary>
    private static byte[] InitialDisk()
    {
        var bytes = new byte[Sectors * Sector];
        for (var i = 0; i < bytes.Length; i++) bytes[i] = (byte)(i / Sector * 0x40 + i % Sector * 7);
        return bytes;
    }

    private static string NewDisk(string dir)
    {
        var path = Path.Combine(dir, "disk0.img");
        File.WriteAllBytes(path, InitialDisk());
        return path;
    }

    [KvmTheory]
    [InlineData(LapicMode.Emulated)]
    [InlineData(LapicMode.Assisted)]
    public async Task A_guest_driver_writes_flushes_and_reads_the_disk_file_through_virtio_blk(LapicMode lapic)
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-blk-").FullName;
        try
        {
            var disk = NewDisk(dir);
            await using (var run = await GuestRun.StartAsync(new VmSpec("blk", 16 << 20, 1, BuildBlk(hostile: false), lapic)
                         {
                             Disk = new DiskSpec(disk),
                         }))
            {
                var outcome = await run.WaitAsync();
                Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
                Assert.Equal(Convert.ToHexString(InitialDisk().AsSpan(2 * Sector, Sector)), Convert.ToHexString(Read(run, ReadData, Sector)));
                Assert.Equal(new byte[] { 0, 0, 0, 0 }, Read(run, Statuses, 4));
                Assert.Equal("disk0.img", Encoding.ASCII.GetString(Read(run, IdData, VirtioBlkRequest.IdBytes)).TrimEnd('\0'));
                var features = BinaryPrimitives.ReadUInt32LittleEndian(Read(run, FeaturesSeen, 4));
                Assert.True((features & VirtioBlkFeatures.ReadOnly) == 0 && (features & VirtioBlkFeatures.Flush) != 0, $"features {features:X8}");
                // The used ring: all four, in order, each with its device-writable length (§2.7.8).
                var used = Read(run, Used, 4 + 8 * 4);
                Assert.Equal(4, BinaryPrimitives.ReadUInt16LittleEndian(used.AsSpan(2)));
                var elements = Enumerable.Range(0, 4).Select(i => (BinaryPrimitives.ReadUInt32LittleEndian(used.AsSpan(4 + 8 * i)),
                    BinaryPrimitives.ReadUInt32LittleEndian(used.AsSpan(8 + 8 * i)))).ToArray();
                Assert.Equal(new (uint, uint)[] { (0, 1), (3, 1), (5, 513), (8, 21) }, elements);
            }
            // The VM is gone and its disk closed (it holds the file exclusively while it runs): sector 1 is
            // the guest's, every other byte as the test wrote it.
            var expected = InitialDisk();
            GuestPattern().CopyTo(expected, Sector);
            Assert.Equal(Convert.ToHexString(expected), Convert.ToHexString(await File.ReadAllBytesAsync(disk)));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>A read-only disk (<c>,ro</c>): VIRTIO_BLK_F_RO offered, the guest's write answered
    /// VIRTIO_BLK_S_IOERR (§5.2.6.2), the file unchanged; flush, read and GET_ID still succeed.</summary>
    [KvmFact]
    public async Task A_read_only_disk_refuses_the_guests_write_and_the_file_is_unchanged()
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-blk-ro-").FullName;
        try
        {
            var disk = NewDisk(dir);
            await using var run = await GuestRun.StartAsync(new VmSpec("blk", 16 << 20, 1, BuildBlk(hostile: false), LapicMode.Emulated)
            {
                Disk = new DiskSpec(disk, ReadOnly: true),
            });
            var outcome = await run.WaitAsync();
            Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
            Assert.Equal(Convert.ToHexString(InitialDisk()), Convert.ToHexString(await File.ReadAllBytesAsync(disk)));
            Assert.Equal(new byte[] { VirtioBlkRequest.StatusIoErr, 0, 0, 0 }, Read(run, Statuses, 4));
            Assert.Equal(Convert.ToHexString(InitialDisk().AsSpan(2 * Sector, Sector)), Convert.ToHexString(Read(run, ReadData, Sector)));
            var features = BinaryPrimitives.ReadUInt32LittleEndian(Read(run, FeaturesSeen, 4));
            Assert.True((features & VirtioBlkFeatures.ReadOnly) != 0, $"features {features:X8}");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>The OUT's data descriptor points outside guest RAM: the device touches neither guest
    /// memory nor the file, sets DEVICE_NEEDS_RESET and signals a configuration change (§2.1.2,
    /// §4.1.5.4); nothing is used, the device actor never fails, the guest resets the device and exits.</summary>
    [KvmFact]
    public async Task A_chain_outside_ram_marks_the_disk_broken_and_leaves_the_file_alone()
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-blk-hostile-").FullName;
        try
        {
            var disk = NewDisk(dir);
            await using (var run = await GuestRun.StartAsync(new VmSpec("blk", 16 << 20, 1, BuildBlk(hostile: true), LapicMode.Emulated)
                         {
                             Disk = new DiskSpec(disk),
                         }))
            {
                var outcome = await run.WaitAsync();
                Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
                Assert.True((Read(run, StatusSeen, 1)[0] & VirtioStatus.DeviceNeedsReset) != 0, $"device status {Read(run, StatusSeen, 1)[0]:X2}");
                Assert.Equal(ConfigVector, Read(run, VectorSeen, 1)[0]);
                Assert.Equal(0, BinaryPrimitives.ReadUInt16LittleEndian(Read(run, Used + 2, 2)));
                Assert.Equal(new byte[] { 0xFF, 0xFF, 0xFF, 0xFF }, Read(run, Statuses, 4));
                var status = await run.StatusAsync();
                Assert.Empty(status.Restarts ?? []);
            }
            Assert.Equal(Convert.ToHexString(InitialDisk()), Convert.ToHexString(await File.ReadAllBytesAsync(disk)));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static byte[] Read(GuestRun run, ulong gpa, int length)
    {
        var bytes = new byte[length];
        Assert.True(run.Vm.Memory.TryRead(new LibVmm.GuestPhysAddr(gpa), bytes));
        return bytes;
    }

    /// <summary>
    /// The device actor fails between two batches of requests (the guest waits at a gate after the first):
    /// it restarts from its record with the VM's open file, its BAR where the guest put it, its MSI-X table
    /// and its queue going on from the used ring. The second batch (OUT to sector 3, IN of sector 1, which
    /// the first batch wrote) completes with its interrupt; no request is lost or done twice (used.idx 6).
    /// </summary>
    [KvmFact]
    public async Task A_restarted_virtio_blk_actor_goes_on_with_the_same_file_and_queue()
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-blk-restart-").FullName;
        try
        {
            var disk = NewDisk(dir);
            var gate = new HostGate();
            await using (var run = await GuestRun.StartAsync(new VmSpec("blk", 16 << 20, 1, BuildBlk(hostile: false, restart: true),
                             LapicMode.Emulated) { Disk = new DiskSpec(disk) }, gate.Device()))
            {
                await gate.ReachedAsync(1, run);
                await run.CrashAsync(PcPlatform.VirtioBlkName, "between two batches");
                gate.Release(1);
                var outcome = await run.WaitAsync();
                Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
                Assert.Equal(6, BinaryPrimitives.ReadUInt16LittleEndian(Read(run, Used + 2, 2)));
                Assert.Equal(new byte[] { 0, 0, 0, 0, 0, 0 }, Read(run, Statuses, 6));
                Assert.Equal(Convert.ToHexString(GuestPattern()), Convert.ToHexString(Read(run, ReadBack, Sector)));
                var status = await run.StatusAsync();
                Assert.Single(status.Restarts ?? [], r => r.StartsWith(PcPlatform.VirtioBlkName, StringComparison.Ordinal));
            }
            var expected = InitialDisk();
            GuestPattern().CopyTo(expected, Sector);
            GuestPattern().CopyTo(expected, 3 * Sector);
            Assert.Equal(Convert.ToHexString(expected), Convert.ToHexString(await File.ReadAllBytesAsync(disk)));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>
    /// A VM with a disk, snapshotted between the two batches and restored in a new process
    /// (<c>run --restore</c>): the snapshot names the file, the restored VM opens it again and its device
    /// goes on from the function's record (BAR, MSI-X, queue, capacity); the second batch writes sector 3
    /// and reads back sector 1, which the first VM wrote.
    /// </summary>
    [KvmFact]
    public async Task A_vm_with_a_disk_snapshotted_and_restored_in_a_new_process_goes_on_with_the_file()
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-blk-snapshot-").FullName;
        try
        {
            var disk = NewDisk(dir);
            var snapshot = Path.Combine(dir, "snap");
            var gate = new HostGate();
            await using (var run = await GuestRun.StartAsync(new VmSpec("blk", 16 << 20, 1, BuildBlk(hostile: false, restart: true),
                             LapicMode.Emulated) { Disk = new DiskSpec(disk) }, gate.Device()))
            {
                await gate.ReachedAsync(1, run);
                var answer = await run.Vm.Actor.Ask<VmProtocol.IVmMessage>(new VmProtocol.TakeSnapshot(snapshot, StopAfter: true),
                    TimeSpan.FromMinutes(3));
                Assert.IsType<VmProtocol.SnapshotTaken>(answer);
                await run.WaitAsync();
            }
            var expected = InitialDisk();
            GuestPattern().CopyTo(expected, Sector);
            Assert.Equal(Convert.ToHexString(expected), Convert.ToHexString(await File.ReadAllBytesAsync(disk)));

            // Restored, the gate's port has no device and reads all ones: the guest goes on at once.
            var (code, _, err) = await ActorVmmProcess.RunAsync(TimeSpan.FromMinutes(5), "run", "--restore", snapshot,
                "--serial", Path.Combine(dir, "serial.txt"), "--timeout", "240");
            Assert.True(code == 1, $"exit code {code} (status {code >> 1}); stderr:\n{err}");
            GuestPattern().CopyTo(expected, 3 * Sector);
            Assert.Equal(Convert.ToHexString(expected), Convert.ToHexString(await File.ReadAllBytesAsync(disk)));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static LongModeImage BuildBlk(bool hostile, bool restart = false)
    {
        var a = new Assembler(64);
        var fail = a.CreateLabel();
        var hlt = a.CreateLabel();
        var hltConfig = a.CreateLabel();
        var hltFirstIrq = a.CreateLabel();
        var hltSecond = a.CreateLabel();
        var hltSecondIrq = a.CreateLabel();
        var handlerQueue = a.CreateLabel();
        var handlerConfig = a.CreateLabel();
        var d = new VirtioDriverCode(a, fail);
        foreach (var (vector, handler) in new[] { (QueueVector, handlerQueue), (ConfigVector, handlerConfig) })
            InterruptCode.SetGate(a, vector, handler);
        InterruptCode.EnableLocalApic(a);

        d.FindAndMap(VirtioBlk.VirtioDeviceId, BarBase);
        d.EnableMsix(QueueVector, ConfigVector);

        // The rings and buffers: zeroed rings, the pattern, 0xEE in the read buffer, 0xFF statuses.
        a.mov(rdi, (long)Desc);
        a.xor(eax, eax);
        a.mov(ecx, (int)(Headers - Desc));
        a.rep.stosb();
        var fill = a.CreateLabel();
        a.mov(rdi, (long)WriteData);
        a.xor(ecx, ecx);
        a.Label(ref fill);
        a.imul(eax, ecx, 0x0101_0101);
        a.xor(eax, unchecked((int)0xA5C3_5A3C));
        a.mov(__dword_ptr[rdi + rcx * 4], eax);
        a.inc(ecx);
        a.cmp(ecx, Sector / 4);
        a.jb(fill);
        a.mov(rdi, (long)ReadData);
        a.mov(al, 0xEE);
        a.mov(ecx, Sector);
        a.rep.stosb();
        a.mov(rdi, (long)Statuses);
        a.mov(rax, -1);
        a.mov(__qword_ptr[rdi], rax);
        a.mov(rdi, (long)IdData);
        a.xor(eax, eax);
        a.mov(ecx, VirtioBlkRequest.IdBytes);
        a.rep.stosb();
        // Headers (§5.2.6): type, reserved, sector.
        (uint Type, ulong Sector)[] requests =
            [(VirtioBlkRequest.Out, 1), (VirtioBlkRequest.Flush, 0), (VirtioBlkRequest.In, 2), (VirtioBlkRequest.GetId, 0),
             (VirtioBlkRequest.Out, 3), (VirtioBlkRequest.In, 1)];
        for (var i = 0; i < requests.Length; i++)
        {
            a.mov(rdi, (long)(Headers + 16 * (ulong)i));
            a.mov(__dword_ptr[rdi], (int)requests[i].Type);
            a.mov(__dword_ptr[rdi + 4], 0);
            a.mov(rax, (long)requests[i].Sector);
            a.mov(__qword_ptr[rdi + 8], rax);
        }

        d.Negotiate((uint)VirtioBlkFeatures.Flush | (uint)VirtioBlkFeatures.ReadOnly, FeaturesSeen, 1);
        d.SetUpQueue(0, QueueSize, 0, Desc, Avail, Used, rsi);
        d.DriverOk();

        const ushort next = 1, write = 2;
        d.Descriptor(Desc, 0, Headers, 16, next, 1);                                    // OUT sector 1
        d.Descriptor(Desc, 1, hostile ? OutsideRam : WriteData, Sector, next, 2);
        d.Descriptor(Desc, 2, Statuses, 1, write);
        d.Descriptor(Desc, 3, Headers + 16, 16, next, 4);                               // FLUSH
        d.Descriptor(Desc, 4, Statuses + 1, 1, write);
        d.Descriptor(Desc, 5, Headers + 32, 16, next, 6);                               // IN sector 2
        d.Descriptor(Desc, 6, ReadData, Sector, write | next, 7);
        d.Descriptor(Desc, 7, Statuses + 2, 1, write);
        d.Descriptor(Desc, 8, Headers + 48, 16, next, 9);                               // GET_ID
        d.Descriptor(Desc, 9, IdData, VirtioBlkRequest.IdBytes, write | next, 10);
        d.Descriptor(Desc, 10, Statuses + 3, 1, write);
        d.MakeAvailable(Avail, 0, rsi, 0, 0, 3, 5, 8);
        d.WaitUsed(Used, 4, hlt);
        if (hostile) d.WaitDword(VectorSeen, ConfigVector, hltConfig); // the configuration change notification
        if (restart)
        {
            // The first batch's interrupt taken (so no late one can stand for the second's), wait at the
            // gate while the host fails the device's actor, then a second batch.
            d.WaitDword(VectorSeen, QueueVector, hltFirstIrq);
            HostGate.SignalAndWait(a, 1);
            d.Descriptor(Desc, 11, Headers + 64, 16, next, 12);                         // OUT sector 3
            d.Descriptor(Desc, 12, WriteData, Sector, next, 13);
            d.Descriptor(Desc, 13, Statuses + 4, 1, write);
            d.Descriptor(Desc, 14, Headers + 80, 16, next, 15);                         // IN sector 1
            d.Descriptor(Desc, 15, ReadBack, Sector, write | next, 16);
            d.Descriptor(Desc, 16, Statuses + 5, 1, write);
            a.mov(rdi, (long)VectorSeen);
            a.mov(__dword_ptr[rdi], 0);
            d.MakeAvailable(Avail, 0, rsi, 4, 11, 14);
            d.WaitUsed(Used, 6, hltSecond);
            d.WaitDword(VectorSeen, QueueVector, hltSecondIrq); // its used-buffer notification came too
            // Checked by the guest too (a restored VM's memory is not the test's to read): both succeeded,
            // and sector 1 read back is the pattern the first batch wrote.
            a.mov(rdi, (long)Statuses + 4);
            a.cmp(__word_ptr[rdi], 0);
            d.Check(23, l => a.jne(l));
            a.mov(rsi, (long)WriteData);
            a.mov(rdi, (long)ReadBack);
            a.mov(ecx, Sector);
            a.repe.cmpsb();
            d.Check(24, l => a.jne(l));
        }

        a.movzx(eax, __byte_ptr[r8 + 0x14]);
        a.mov(rdi, (long)StatusSeen);
        a.mov(__byte_ptr[rdi], al);
        if (hostile)
        {
            a.test(al, VirtioStatus.DeviceNeedsReset);
            d.Check(20, l => a.jz(l));
            a.mov(__byte_ptr[r8 + 0x14], 0);                 // reset: the device answers again
            a.cmp(__byte_ptr[r8 + 0x14], 0);
            d.Check(21, l => a.jne(l));
        }
        else
        {
            a.test(al, VirtioStatus.DeviceNeedsReset);
            d.Check(22, l => a.jnz(l));
        }
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref fail);
        a.mov(al, bl);
        a.@out(0xF4, al);
        a.hlt();

        VirtioDriverCode.Handlers(a, VectorSeen, [(QueueVector, handlerQueue), (ConfigVector, handlerConfig)],
            [hlt, .. hostile ? [hltConfig] : Array.Empty<Label>(), .. restart ? [hltFirstIrq, hltSecond, hltSecondIrq] : Array.Empty<Label>()]);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    // ---- virtio-console ----

    private const ulong RxDesc = 0x20_0000, RxAvail = 0x20_1000, RxUsed = 0x20_2000;
    private const ulong TxDesc = 0x21_0000, TxAvail = 0x21_1000, TxUsed = 0x21_2000;
    private const ulong RxBuffer = 0x22_0000;
    private const ulong TxBuffer = 0x23_0000;
    private const int RxLength = 64;
    private const byte RxVector = 0x51, TxVector = 0x53;
    private const string Hello = "virtio-console: hello\n";

    /// <summary>
    /// The guest posts a 64-byte receive buffer (receiveq, queue 0) and transmits <c>Hello</c> (transmitq,
    /// queue 1): the line appears on the VM's console, where COM1's output goes. The test then gives host
    /// input to the device's actor; it lands in the posted buffer (used with its length, §5.3.6), and the
    /// guest transmits it back, so the console shows it after the hello.
    /// </summary>
    [KvmTheory]
    [InlineData(LapicMode.Emulated)]
    [InlineData(LapicMode.Assisted)]
    public async Task A_guest_driver_talks_through_virtio_console_to_the_vms_console(LapicMode lapic)
    {
        var spec = new VmSpec("vcon", 16 << 20, 1, BuildConsole(), lapic) { VirtioConsole = true };
        await using var run = await GuestRun.StartAsync(spec);
        Assert.True(await run.WaitForSerialAsync(Hello.Length, TimeSpan.FromMinutes(2)), $"console so far: \"{run.Serial}\"");
        Assert.Equal(Hello, run.Serial);
        var input = "ping from the host\n"u8.ToArray();
        (await run.ResolveChild(PcPlatform.VirtioConsoleName)).Tell(new DeviceProtocol.HostInput(input));
        var outcome = await run.WaitAsync();
        Assert.True(outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, $"{outcome} (status {outcome.ExitCode >> 1})");
        Assert.Equal(Hello + "ping from the host\n", run.Serial);
        Assert.Equal(input, Read(run, RxBuffer, input.Length));
        Assert.Equal((uint)input.Length, BinaryPrimitives.ReadUInt32LittleEndian(Read(run, RxUsed + 8, 4)));
    }

    private static LongModeImage BuildConsole()
    {
        var a = new Assembler(64);
        var fail = a.CreateLabel();
        Label[] hlts = [a.CreateLabel(), a.CreateLabel(), a.CreateLabel()];
        var handlerRx = a.CreateLabel();
        var handlerConfig = a.CreateLabel();
        var handlerTx = a.CreateLabel();
        var d = new VirtioDriverCode(a, fail);
        foreach (var (vector, handler) in new[] { (RxVector, handlerRx), (ConfigVector, handlerConfig), (TxVector, handlerTx) })
            InterruptCode.SetGate(a, vector, handler);
        InterruptCode.EnableLocalApic(a);

        d.FindAndMap(VirtioConsole.VirtioDeviceId, BarBase);
        d.EnableMsix(RxVector, ConfigVector, TxVector);      // table entries 0 (rx), 1 (config), 2 (tx)
        foreach (var (from, to) in new[] { (RxDesc, RxDesc + 0x3000), (TxDesc, TxDesc + 0x3000) })
        {
            a.mov(rdi, (long)from);
            a.xor(eax, eax);
            a.mov(ecx, (int)(to - from));
            a.rep.stosb();
        }
        var hello = Encoding.ASCII.GetBytes(Hello);
        a.mov(rdi, (long)TxBuffer);
        for (var i = 0; i < hello.Length; i++) a.mov(__byte_ptr[rdi + i], hello[i]);

        d.Negotiate(0, FeaturesSeen, 1);
        d.SetUpQueue(0, 8, 0, RxDesc, RxAvail, RxUsed, rsi);  // RSI: receiveq's notify address
        d.SetUpQueue(1, 8, 2, TxDesc, TxAvail, TxUsed, rdx);  // RDX: transmitq's (no port access from here on)
        d.DriverOk();

        const ushort write = 2;
        d.Descriptor(RxDesc, 0, RxBuffer, RxLength, write);
        d.MakeAvailable(RxAvail, 0, rsi, 0, 0);
        d.Descriptor(TxDesc, 0, TxBuffer, (uint)hello.Length, 0);
        d.MakeAvailable(TxAvail, 1, rdx, 0, 0);
        d.WaitUsed(TxUsed, 1, hlts[0]);
        d.WaitUsed(RxUsed, 1, hlts[1]);                       // the host's input
        a.mov(rdi, (long)RxUsed);
        a.mov(ecx, __dword_ptr[rdi + 8]);                     // its length
        a.test(ecx, ecx);
        d.Check(20, l => a.jz(l));
        d.Descriptor(TxDesc, 1, RxBuffer, 0, 0);
        a.mov(rdi, (long)TxDesc + 16);
        a.mov(__dword_ptr[rdi + 8], ecx);                     // echo exactly what came in
        d.MakeAvailable(TxAvail, 1, rdx, 1, 1);
        d.WaitUsed(TxUsed, 2, hlts[2]);
        a.test(__byte_ptr[r8 + 0x14], VirtioStatus.DeviceNeedsReset);
        d.Check(21, l => a.jnz(l));
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref fail);
        a.mov(al, bl);
        a.@out(0xF4, al);
        a.hlt();

        VirtioDriverCode.Handlers(a, VectorSeen, [(RxVector, handlerRx), (ConfigVector, handlerConfig), (TxVector, handlerTx)], hlts);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }
}
