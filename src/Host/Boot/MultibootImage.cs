using System.Buffers.Binary;
using System.Text;
using ActorVmm.LibVmm;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Boot;

/// <summary>A module handed to a multiboot kernel: its bytes and its command-line string.</summary>
public sealed record MultibootModule(byte[] Data, string CommandLine);

/// <summary>
/// Multiboot (version 0.6.96) loader: an ELF kernel (or one using the header's address fields),
/// modules, a command line and a memory map, entered in 32-bit flat protected mode with
/// EAX = 0x2BADB002 and EBX = the physical address of the multiboot information structure —
/// the way standard x86 test kernels are started.
/// Boot structures live at 0x1000–0x7FFF: GDT 0x1000, information 0x1100, memory map 0x1200,
/// module list 0x1400, strings 0x1800–0x7FFF. Modules follow the kernel, page aligned.
/// </summary>
public sealed record MultibootImage(byte[] Kernel, string CommandLine, IReadOnlyList<MultibootModule> Modules) : BootImage
{
    public const uint HeaderMagic = 0x1BAD_B002;
    public const uint BootloaderMagic = 0x2BAD_B002;
    public const int HeaderSearchLimit = 8192;

    public const ulong GdtAddress = 0x1000;
    public const ulong InfoAddress = 0x1100;
    public const ulong MemoryMapAddress = 0x1200;
    public const ulong ModuleListAddress = 0x1400;
    public const ulong StringsAddress = 0x1800;
    public const ulong BootAreaEnd = 0x8000;
    public const ulong StackTop = 0x9F000;
    public const int MaxModules = 64;
    public const int MaxMemoryMapEntries = 16;
    public const string LoaderName = "ActorVmm";

    // Header flags (multiboot spec §3.1.2).
    public const uint FlagPageAlignModules = 1u << 0;
    public const uint FlagMemoryInfo = 1u << 1;
    public const uint FlagVideoMode = 1u << 2;
    public const uint FlagAddressFields = 1u << 16;

    // Information flags (§3.3).
    public const uint InfoMemory = 1u << 0;
    public const uint InfoCommandLine = 1u << 2;
    public const uint InfoModules = 1u << 3;
    public const uint InfoMemoryMap = 1u << 6;
    public const uint InfoLoaderName = 1u << 9;

    /// <summary>The multiboot header: where it is in the file and its flags.</summary>
    public sealed record Header(int Offset, uint Flags, uint HeaderAddr, uint LoadAddr, uint LoadEndAddr, uint BssEndAddr, uint EntryAddr);

    /// <summary>Finds a valid header (magic + flags + checksum = 0, 4-byte aligned, in the first 8 KiB).</summary>
    public static Header? FindHeader(ReadOnlySpan<byte> kernel)
    {
        var limit = Math.Min(kernel.Length, HeaderSearchLimit) - 12;
        for (var at = 0; at <= limit; at += 4)
        {
            if (U32(kernel, at) != HeaderMagic) continue;
            var flags = U32(kernel, at + 4);
            if (unchecked(HeaderMagic + flags + U32(kernel, at + 8)) != 0) continue;
            if ((flags & FlagAddressFields) != 0 && at + 32 <= kernel.Length)
                return new Header(at, flags, U32(kernel, at + 12), U32(kernel, at + 16), U32(kernel, at + 20),
                    U32(kernel, at + 24), U32(kernel, at + 28));
            return new Header(at, flags, 0, 0, 0, 0, 0);
        }
        return null;
    }

    public override BootState Load(IGuestMemory memory)
    {
        var header = FindHeader(Kernel) ?? throw new BootException("the kernel has no multiboot header in its first 8 KiB");
        var unsupported = header.Flags & 0xFFFF & ~(FlagPageAlignModules | FlagMemoryInfo);
        if ((unsupported & FlagVideoMode) != 0)
            throw new BootException("the multiboot header requests video mode information (flag 2), which ActorVmm does not provide");
        if (unsupported != 0)
            throw new BootException($"the multiboot header requires features ActorVmm does not know (flags 0x{unsupported:X})");
        if (Modules.Count > MaxModules) throw new BootException($"{Modules.Count} modules; at most {MaxModules}");

        var (entry, kernelEnd) = (header.Flags & FlagAddressFields) != 0 ? LoadByAddressFields(memory, header) : LoadElf(memory);

        LongModeImage.WriteGdt(memory);
        var strings = new StringArea(memory);
        var info = new byte[120];
        var flags = InfoMemory | InfoCommandLine | InfoMemoryMap | InfoLoaderName;

        var ranges = memory.Ranges.Where(r => !r.ReadOnly).ToArray();
        var lowEnd = ranges.Where(r => r.Base.Value == 0).Select(r => r.End).DefaultIfEmpty(0UL).First();
        var conventional = Math.Min(lowEnd, 0x9FC00UL);
        var upper = ranges.FirstOrDefault(r => r.Base.Value <= 0x10_0000 && r.End > 0x10_0000);
        var upperKiB = upper.Size == 0 ? 0 : (upper.End - 0x10_0000) / 1024;
        Put(info, 4, (uint)(conventional / 1024));
        Put(info, 8, (uint)Math.Min(upperKiB, uint.MaxValue));
        Put(info, 16, strings.Add(CommandLine));

        // Modules: page aligned after the kernel (and after 1 MiB).
        var next = Align(Math.Max(kernelEnd, 0x10_0000), 4096);
        if (Modules.Count > 0)
        {
            flags |= InfoModules;
            var list = new byte[16 * Modules.Count];
            for (var i = 0; i < Modules.Count; i++)
            {
                var m = Modules[i];
                if (m.Data.Length == 0) throw new BootException($"module {i} ({m.CommandLine}) is empty");
                var start = next;
                if (start + (ulong)m.Data.Length > uint.MaxValue || !memory.IsMapped(new GuestPhysAddr(start), (ulong)m.Data.Length))
                    throw new BootException($"module {i} ({m.CommandLine}, {m.Data.Length} bytes) does not fit in guest RAM below 4 GiB");
                memory.Write(new GuestPhysAddr(start), m.Data);
                Put(list, i * 16, (uint)start);
                Put(list, i * 16 + 4, (uint)(start + (ulong)m.Data.Length));
                Put(list, i * 16 + 8, strings.Add(m.CommandLine));
                next = Align(start + (ulong)m.Data.Length, 4096);
            }
            memory.Write(new GuestPhysAddr(ModuleListAddress), list);
            Put(info, 20, (uint)Modules.Count);
            Put(info, 24, (uint)ModuleListAddress);
        }

        var map = MemoryMap(ranges);
        memory.Write(new GuestPhysAddr(MemoryMapAddress), map);
        Put(info, 44, (uint)map.Length);
        Put(info, 48, (uint)MemoryMapAddress);
        Put(info, 64, strings.Add(LoaderName));
        Put(info, 0, flags);
        memory.Write(new GuestPhysAddr(InfoAddress), info);

        // Multiboot machine state (§3.2): 32-bit flat segments, PE on, paging off, IF clear.
        var regs = RegisterState.Reset with { Rax = BootloaderMagic, Rbx = InfoAddress, Rip = entry, Rsp = StackTop, Rflags = 0x2 };
        return new BootState(regs, s => s with
        {
            Cs = SegmentState.Flat32(LongModeImage.Code32Selector, code: true),
            Ds = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Es = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Fs = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Gs = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Ss = SegmentState.Flat32(LongModeImage.DataSelector, code: false),
            Gdt = new TableState(GdtAddress, 4 * 8 - 1),
            Idt = new TableState(0, 0),
            Cr0 = SpecialRegisterState.Cr0Pe | SpecialRegisterState.Cr0Et,
            Cr3 = 0,
            Cr4 = 0,
            Efer = 0,
        });
    }

    private (ulong Entry, ulong End) LoadElf(IGuestMemory memory)
    {
        var elf = ElfImage.Parse(Kernel, "the multiboot kernel");
        ulong end = 0;
        foreach (var s in elf.Segments)
        {
            CheckPlacement(memory, s.PhysicalAddress, s.MemorySize, "kernel segment");
            memory.Write(new GuestPhysAddr(s.PhysicalAddress), Kernel.AsSpan((int)s.FileOffset, (int)s.FileSize));
            if (s.MemorySize > s.FileSize)
                memory.Write(new GuestPhysAddr(s.PhysicalAddress + s.FileSize), new byte[s.MemorySize - s.FileSize]);
            end = Math.Max(end, s.PhysicalAddress + s.MemorySize);
        }
        if (elf.Entry > uint.MaxValue) throw new BootException($"the kernel's entry 0x{elf.Entry:X} is above 4 GiB (multiboot enters in 32-bit mode)");
        return (elf.Entry, end);
    }

    /// <summary>The a.out kludge (flag 16): the header says where the file goes.</summary>
    private (ulong Entry, ulong End) LoadByAddressFields(IGuestMemory memory, Header h)
    {
        if (h.LoadAddr > h.HeaderAddr) throw new BootException("multiboot header: load_addr is above header_addr");
        var fileStart = (long)h.Offset - (h.HeaderAddr - h.LoadAddr);
        if (fileStart < 0) throw new BootException("multiboot header: header_addr - load_addr points before the start of the file");
        var loadEnd = h.LoadEndAddr == 0 ? h.LoadAddr + (ulong)(Kernel.Length - fileStart) : h.LoadEndAddr;
        if (loadEnd < h.LoadAddr || (ulong)fileStart + (loadEnd - h.LoadAddr) > (ulong)Kernel.Length)
            throw new BootException("multiboot header: load_end_addr lies outside the file");
        var bssEnd = h.BssEndAddr == 0 ? loadEnd : h.BssEndAddr;
        if (bssEnd < loadEnd) throw new BootException("multiboot header: bss_end_addr is below load_end_addr");
        CheckPlacement(memory, h.LoadAddr, bssEnd - h.LoadAddr, "kernel");
        memory.Write(new GuestPhysAddr(h.LoadAddr), Kernel.AsSpan((int)fileStart, (int)(loadEnd - h.LoadAddr)));
        if (bssEnd > loadEnd) memory.Write(new GuestPhysAddr(loadEnd), new byte[bssEnd - loadEnd]);
        if (h.EntryAddr < h.LoadAddr || h.EntryAddr >= bssEnd) throw new BootException($"multiboot header: entry 0x{h.EntryAddr:X} is outside the loaded image");
        return (h.EntryAddr, bssEnd);
    }

    private static void CheckPlacement(IGuestMemory memory, ulong address, ulong size, string what)
    {
        if (address < BootAreaEnd && address + size > GdtAddress)
            throw new BootException($"{what} at 0x{address:X} overlaps the boot information area 0x{GdtAddress:X}-0x{BootAreaEnd - 1:X}");
        if (address + size > uint.MaxValue || !memory.IsMapped(new GuestPhysAddr(address), size))
            throw new BootException($"{what} at 0x{address:X} ({size} bytes) does not fit in guest RAM");
    }

    /// <summary>E820-style map (§3.3 mmap_*): RAM as available; the EBDA and BIOS area reserved.</summary>
    private static byte[] MemoryMap(IReadOnlyList<GuestRange> ram)
    {
        var entries = new List<(ulong Base, ulong Length, uint Type)>();
        foreach (var r in ram)
        {
            if (r.Base.Value == 0 && r.End > 0x9FC00)
            {
                entries.Add((0, 0x9FC00, 1));
                entries.Add((0x9FC00, 0x400, 2));
                if (r.End > 0x10_0000) entries.Add((0x10_0000, r.End - 0x10_0000, 1));
            }
            else entries.Add((r.Base.Value, r.Size, 1));
        }
        entries.Insert(Math.Min(entries.Count, 2), (0xF0000, 0x10000, 2));
        entries = entries.OrderBy(e => e.Base).Take(MaxMemoryMapEntries).ToList();
        var bytes = new byte[24 * entries.Count];
        for (var i = 0; i < entries.Count; i++)
        {
            Put(bytes, i * 24, 20u);
            BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(i * 24 + 4), entries[i].Base);
            BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(i * 24 + 12), entries[i].Length);
            Put(bytes, i * 24 + 20, entries[i].Type);
        }
        return bytes;
    }

    private static ulong Align(ulong v, ulong a) => (v + a - 1) & ~(a - 1);
    private static uint U32(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt32LittleEndian(b[at..]);
    private static void Put(byte[] b, int at, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(at), v);

    /// <summary>NUL-terminated strings packed into 0x1800–0x7FFF.</summary>
    private sealed class StringArea(IGuestMemory memory)
    {
        private ulong _next = StringsAddress;

        public uint Add(string s)
        {
            var bytes = Encoding.UTF8.GetBytes(s + "\0");
            if (_next + (ulong)bytes.Length > BootAreaEnd)
                throw new BootException($"command lines and module names exceed {BootAreaEnd - StringsAddress} bytes");
            var at = _next;
            memory.Write(new GuestPhysAddr(at), bytes);
            _next += (ulong)bytes.Length;
            return (uint)at;
        }
    }
}

/// <summary>What kind of kernel a file is, decided by its contents (for `run --kernel`).</summary>
public static class KernelKind
{
    /// <summary>
    /// A multiboot kernel gets "NAME APPEND" as its command line (the kernel's file name first, as
    /// GRUB passes it) and the initrd as its first module; a Linux bzImage gets APPEND as its
    /// command line and the initrd as its initial ramdisk; a PVH ELF kernel (vmlinux) APPEND and the
    /// initrd as its one module.
    /// </summary>
    public static BootImage Recognise(byte[] kernel, string path, string append, byte[]? initrd, string initrdName = "initrd")
    {
        if (MultibootImage.FindHeader(kernel) is not null)
        {
            var commandLine = Path.GetFileName(path) + (append.Length > 0 ? " " + append : "");
            return new MultibootImage(kernel, commandLine, initrd is null ? [] : [new MultibootModule(initrd, initrdName)]);
        }
        if (LinuxImage.HasHeaderMagic(kernel))
        {
            LinuxImage.ReadHeader(kernel); // refuse a kernel this loader cannot enter before the VM is built
            return new LinuxImage(kernel, append, initrd);
        }
        if (ElfImage.HasElfMagic(kernel))
        {
            if (PvhImage.FindEntry(kernel) is not null) return new PvhImage(kernel, append, initrd);
            throw new BootException($"{path} is an ELF file without a multiboot header or a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): " +
                                    "only multiboot ELF kernels, PVH ELF kernels (vmlinux) and Linux bzImages are supported");
        }
        throw new BootException($"{path} is not a kernel ActorVmm recognises (no multiboot header, not ELF, not a Linux bzImage)");
    }
}
